"""How a stage executes: its device and precision there, its progress bars, and the software versions it records."""

from __future__ import annotations

import contextlib
import platform
from importlib import metadata

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from richkd.pipeline.errors import UserError
from richkd.pipeline.runtime import DEVICE_CHOICES, console, local_rank


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":  # under torchrun, each process on a node takes its own GPU
        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"unknown device '{name}'; use {DEVICE_CHOICES}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device '{name}'; use {DEVICE_CHOICES}")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 on the CPU, where results must be reproducible bit for bit."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("richkd", "torch", "torchvision", "open_clip_torch", "timm", "zarr", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class RateColumn(ProgressColumn):
    """Items per second over the task's lifetime."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        rate = task.completed / task.elapsed if task.elapsed else 0.0
        return Text(f"{rate:,.1f} {self.unit}/s", style="progress.data.speed")


# False in a process that shares its terminal with others running at the same time.
progress_bars_shown = True


def hide_progress_bars() -> None:
    global progress_bars_shown
    progress_bars_shown = False


def progress_bar(unit: str, disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        # Gone when done: a run's summary line follows, and an error stays the last (only) line.
        transient=True,
        disable=disable or not progress_bars_shown,
    )
