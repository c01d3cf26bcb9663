"""Every dataset richkd reads, opened by name: CIFAR and image folders (`data`), the demo and tar shards."""

from __future__ import annotations

from pathlib import Path

from richkd.pipeline import demo, shards  # noqa: F401 (importing them registers their datasets)
from richkd.pipeline.data import DATASETS, ImageDataset
from richkd.pipeline.errors import UserError


def open_dataset(name: str, root: str | Path, split: str = "train", download: bool = False) -> ImageDataset:
    """The `split` of dataset `name` stored under `root` (fetched first when `download`)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; known datasets: {', '.join(sorted(DATASETS))}")
    # A URL stays text (a Path would fold its '//'); datasets that read URLs take either.
    dataset = DATASETS[name](root if "://" in str(root) else Path(root), split, download)
    if len(dataset) == 0:
        raise UserError(f"dataset '{name}' split '{split}' under {root} has no samples")
    return dataset
