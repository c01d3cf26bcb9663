"""Reading and writing model checkpoints.

Accepted formats: mdistiller's {"model": state_dict, "epoch": ..., ...}, a plain state_dict,
{"state_dict": state_dict, ...}, and richkd's own {"model": state_dict, "arch": ..., "num_classes": ..., "crc32c": ...}.
torch's files carry no checksum it checks, so a flipped byte would load as other weights or other training state:
richkd's checkpoints record the crc32c of everything else they hold, and every read checks it.
"""

import contextlib
import hashlib
import io
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import crc32c
import torch
from torch import nn

from richkd.pipeline.errors import UserError, out_of_space_is_a_user_error, preview

STATE_DICT_ENTRIES = ("model", "state_dict")
DDP_PREFIX = "module."
# Checkpoints and bundle files are written under a temporary name, then renamed into place.
TEMPORARY_SUFFIX = ".tmp"
# The entry of a richkd checkpoint holding the crc32c of its other entries; checkpoints of other codebases have none.
CHECKSUM_ENTRY = "crc32c"
# What to do about a damaged checkpoint, where the reader knows no better.
DAMAGED_ADVICE = "restore it from a copy, or train it again"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike, advice: str) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write; once written and on disk it is renamed to `path`,
    so readers see the old file or the complete new one. A full disk is a user error that says `advice`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so the rename is atomic; a plain name, so the file gets the usual permissions.
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        with out_of_space_is_a_user_error(str(path), advice):
            yield temporary
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> None:
    """Write a richkd checkpoint atomically: the model's state_dict and `metadata` (a classifier's arch and
    num_classes, which load_checkpoint checks; a run's epoch, optimiser state, ...)."""
    advice = "the previous checkpoint there is intact; free some space and continue the run with --resume"
    payload = {"model": model.state_dict(), **metadata}
    payload[CHECKSUM_ENTRY] = content_crc32c(payload)
    # Serialised in memory first: torch.save turns a write that fails on a full disk into a RuntimeError
    # ("unexpected pos") that no longer says why, where a plain write raises the disk's OSError.
    serialized = io.BytesIO()
    torch.save(payload, serialized)
    with written_atomically(path, advice) as temporary, open(temporary, "wb") as file:
        file.write(serialized.getbuffer())


def remove_unfinished_writes(folder: str | os.PathLike) -> None:
    """Delete the temporary files of atomic writes that a killed process left in `folder`."""
    for unfinished in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        unfinished.unlink(missing_ok=True)


def content_crc32c(value: object, checksum: int = 0) -> int:
    """crc32c of everything `value` (a checkpoint's payload) holds, entry by entry, in order: the same for a
    payload before saving and after loading, whatever the layout or device of its tensors."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        checksum = crc32c.crc32c(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode(), checksum)
        return crc32c.crc32c(tensor.reshape(-1).view(torch.uint8).numpy(), checksum)
    # Containers by kind, not type: what loading gives back for a dict or a tuple is no part of the contents.
    if isinstance(value, Mapping):
        kind, entries = "mapping", value.items()
    elif isinstance(value, (list, tuple)):
        kind, entries = "sequence", enumerate(value)
    else:
        return crc32c.crc32c(f"{type(value).__name__} {value!r};".encode(), checksum)
    checksum = crc32c.crc32c(f"{kind} of {len(value)}:".encode(), checksum)
    for key, entry in entries:
        checksum = content_crc32c(entry, content_crc32c(key, checksum))
    return checksum


def read_checkpoint(path: str | os.PathLike, if_damaged: str = DAMAGED_ADVICE
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, the checkpoint's other entries) of any accepted format, without a model. A richkd checkpoint
    whose contents do not match its checksum is refused, saying `if_damaged`: what the user can do about it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    # What torch.load raises on a file that is no checkpoint, and what its unpickler raises on damaged records.
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError,
            IndexError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"checkpoint {path}: {_unreadable_reason(error)}") from error
    if isinstance(payload, Mapping) and CHECKSUM_ENTRY in payload:
        payload = dict(payload)
        recorded = payload.pop(CHECKSUM_ENTRY)
        if recorded != content_crc32c(payload):
            raise UserError(f"checkpoint {path} is damaged (its contents do not match the crc32c checksum saved "
                            f"with them): {if_damaged}")
    split = _split_payload(payload)
    if split is None:
        raise UserError(
            f"checkpoint {path}: holds no state_dict (neither a state_dict nor a dict with a "
            f"{' or '.join(map(repr, STATE_DICT_ENTRIES))} entry)"
        )
    state, metadata = split
    # checkpoints saved from a DistributedDataParallel wrapper
    if all(key.startswith(DDP_PREFIX) for key in state):
        state = {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}
    return dict(state), metadata


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint strictly into `model` (from create_model); return its other entries (e.g. epoch)."""
    state, metadata = read_checkpoint(path)
    mismatch = _describe_mismatch(model, state, metadata)
    if mismatch:
        raise UserError(f"checkpoint {path}: {mismatch}")
    model.load_state_dict(state, strict=True)
    return metadata


def _unreadable_reason(error: Exception) -> str:
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if refused:
        return f"holds a {refused[1]} object, which weights-only loading refuses"
    return "not a torch checkpoint, or a damaged or truncated one"


def _is_state_dict(candidate: object) -> bool:
    return (
        isinstance(candidate, Mapping)
        and len(candidate) > 0
        and all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in candidate.items())
    )


def _split_payload(payload: object) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]] | None:
    """(state_dict, other entries) of a loaded checkpoint, None when it holds no state_dict."""
    if _is_state_dict(payload):
        return payload, {}
    if isinstance(payload, Mapping):
        for entry in STATE_DICT_ENTRIES:
            if _is_state_dict(payload.get(entry)):
                return payload[entry], {key: value for key, value in payload.items() if key != entry}
    return None


def _describe_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> str:
    """Why `state` does not fit `model`, most telling reason first; empty if it fits."""
    arch = metadata.get("arch")
    if arch is not None and arch != model.arch:
        return f"saved for arch {arch!r}, the model is {model.arch!r}"
    classifier_weight = state.get(f"{model.classifier_name}.weight")
    if classifier_weight is not None and classifier_weight.shape[0] != model.num_classes:
        return f"checkpoint has {classifier_weight.shape[0]} classes, model has {model.num_classes}"
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys ({preview(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({preview(unexpected)})")
    if problems:
        return "; ".join(problems)
    wrong_shapes = [
        f"{key} is {list(state[key].shape)} in the checkpoint, {list(value.shape)} in the model"
        for key, value in expected.items()
        if state[key].shape != value.shape
    ]
    if wrong_shapes:
        return f"{len(wrong_shapes)} shape mismatches: {preview(wrong_shapes)}"
    # load_state_dict would cast integer weights to float and keep NaN: a model that computes nonsense.
    wrong_types = [f"{key} is {state[key].dtype}" for key, value in expected.items()
                   if value.is_floating_point() and not state[key].is_floating_point()]
    if wrong_types:
        return f"{len(wrong_types)} weights are not floating point: {preview(wrong_types)}"
    not_finite = [key for key, value in expected.items() if value.is_floating_point()
                  and not torch.isfinite(state[key]).all()]
    if not_finite:
        return f"{len(not_finite)} weights hold NaN or infinite values: {preview(not_finite)}"
    return ""
