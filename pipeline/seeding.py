"""Every random draw of a run from its own seeded stream (the initial weights, the validation samples, each
epoch's order), and the global RNG states a checkpoint saves."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from richkd.pipeline.config import require
from richkd.pipeline.models import create_model

# Purposes of the per-epoch generators.
ORDER, NEGATIVES, CRD_MEMORY, SHUFFLE, VALIDATION = 0, 1, 2, 3, 4


def seeded_generator(seed: int, epoch: int, purpose: int, *stream: int) -> torch.Generator:
    """An independent stream per (seed, epoch, purpose, *stream): nothing depends on what ran before it."""
    state = np.random.SeedSequence([seed, epoch, purpose, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def rng_states() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "cached": cached}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seeded_model(arch: str, num_classes: int, seed: int) -> nn.Module:
    """A fresh model whose initial weights depend on `seed` alone."""
    torch.manual_seed(seed)
    return create_model(arch, num_classes)


def holdout_split(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training samples, validation samples), sorted: `fraction` (--val-fraction) of the split, drawn by `seed`."""
    count = round(fraction * num_samples)
    require(count < num_samples, f"--val-fraction {fraction} leaves no training sample of {num_samples}")
    shuffled = np.random.default_rng((seed, VALIDATION)).permutation(num_samples)
    return np.sort(shuffled[count:]), np.sort(shuffled[:count])
