"""The per-channel input normalisation of a model: named, given as numbers, or measured on the data.

A model is always fed the normalisation it was trained with: `train` and `distill` record theirs in the
checkpoint, `precompute` records the teacher's in the store, and `--normalize auto` picks the recorded one up
(from the teacher checkpoint in precompute, the store in distill, each checkpoint in evaluate).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from richkd.pipeline.config import MEASURED_IMAGES, normalization_numbers, require
from richkd.pipeline.data import IMAGENET_MEAN, IMAGENET_STD
from richkd.pipeline.errors import UserError


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Where the numbers come from, for the start-up line.
    source: str

    def describe(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    def summary(self) -> str:
        return f"normalization: {self.source}, mean {format_channels(self.mean)}, std {format_channels(self.std)}"

    def same_numbers(self, other: Normalization) -> bool:
        return np.allclose(self.mean + self.std, other.mean + other.std, rtol=0, atol=1e-6)


def format_channels(values) -> str:
    return "(" + ", ".join(f"{value:.4g}" for value in values) + ")"


def given_normalization(spec: str) -> Normalization:
    """`--normalize imagenet`, `clip` or numbers."""
    if spec == "imagenet":
        return Normalization(IMAGENET_MEAN, IMAGENET_STD, "ImageNet's")
    if spec == "clip":
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        return Normalization(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, "OpenAI CLIP's")
    mean, std = normalization_numbers(spec)
    return Normalization(mean, std, "as given")


def measured_normalization(dataset) -> Normalization:
    """Mean and std of every pixel of up to MEASURED_IMAGES images of `dataset`, evenly spaced."""
    if getattr(dataset, "load", None) is None:  # a ShardSet, or a split scanned to be streamed
        raise UserError("--normalize dataset measures images read by index, which streamed shards are not: "
                        "measure it in a run without --stream (its store or checkpoint records it), or give its "
                        "numbers to --normalize")
    picked = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), MEASURED_IMAGES)).round().astype(int))
    sums, squares, pixels = np.zeros(3), np.zeros(3), 0
    for index in picked:
        image = dataset.image(int(index)).double().div_(255).flatten(1)
        sums += image.sum(dim=1).numpy()
        squares += image.square().sum(dim=1).numpy()
        pixels += image.shape[1]
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0))
    require(bool((std > 0).all()), f"--normalize dataset: a channel of the {len(picked)} images "
                                   f"measured in {dataset.split} is constant, so it has no std to divide by")
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()),
                         f"measured on {len(picked):,} images of {dataset.split}")


def choose_normalization(spec: str, dataset, recorded: dict | None = None, recorded_by: str = "",
                         binding: bool = False) -> Normalization:
    """What a model is fed. `recorded` is the normalisation `recorded_by` holds, which `auto` takes; when
    `binding`, it belongs to the model itself, which must be fed nothing else."""
    if spec == "auto":
        if recorded is not None:
            return Normalization(tuple(recorded["mean"]), tuple(recorded["std"]), f"as {recorded_by} records")
        return Normalization(tuple(dataset.mean), tuple(dataset.std), f"{dataset.name}'s own")
    chosen = measured_normalization(dataset) if spec == "dataset" else given_normalization(spec)
    if binding and recorded is not None:
        trained = Normalization(tuple(recorded["mean"]), tuple(recorded["std"]), "")
        if not chosen.same_numbers(trained):
            raise UserError(f"{recorded_by} was trained on inputs normalised with mean {format_channels(trained.mean)}"
                            f", std {format_channels(trained.std)}; --normalize {spec} gives mean "
                            f"{format_channels(chosen.mean)}, std {format_channels(chosen.std)}: leave --normalize "
                            "at auto (it is for models that record none)")
    return chosen


def normalized(dataset, normalization: Normalization):
    """`dataset` (an ImageDataset or a ShardSet) whose images are fed to the model with `normalization`."""
    return dataclasses.replace(dataset, mean=normalization.mean, std=normalization.std)
