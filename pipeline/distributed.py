"""Several processes at once: torchrun's process group (`richkd.pipeline.runtime` says which part of the work a
process does, for torchrun's ranks and `--part i/n` jobs on separate machines)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from richkd.pipeline.errors import UserError
from richkd.pipeline.runtime import Part, torchrun_part


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Part]:
    """The torchrun process group (NCCL on CUDA, gloo on the CPU) for the duration; this process's Part."""
    part = torchrun_part()
    if part.count == 1 or dist.is_initialized():
        yield part
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=part.index, world_size=part.count)
    try:
        yield part
    finally:
        dist.destroy_process_group()


T = TypeVar("T")


def main_process_first(first: Callable[[], T], then: Callable[[], T]) -> T:
    """`first()` on rank 0, then, once it succeeded, `then()` on the other ranks (e.g. make a store, then open
    it). Whatever `first()` raises reaches every rank, so that none waits for the others for ever: a user error
    as itself, anything else as a RuntimeError naming it (rank 0 keeps its own traceback)."""
    if not dist.is_initialized():
        return first()
    if dist.get_rank() == 0:
        try:
            result = first()
        except Exception as error:  # re-raised here, after the other ranks are told
            dist.broadcast_object_list([(isinstance(error, UserError), f"{type(error).__name__}: {error}",
                                         str(error))], src=0)
            raise
        dist.broadcast_object_list([None], src=0)
        return result
    outcome = [None]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        user_error, described, message = outcome[0]
        raise UserError(message) if user_error else RuntimeError(f"the first process failed: {described}")
    return then()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
