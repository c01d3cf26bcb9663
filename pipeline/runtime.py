"""Where a stage runs: its output channels, and which part of the work this process does.

Light to import, so that the command line answers `--help` at once; `richkd.pipeline.execution` has the rest.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from rich.console import Console

from richkd.pipeline.errors import UserError

# The two channels of every command: messages and progress on stderr, results (tables, JSON) on stdout.
console = Console(stderr=True)
results = Console()


def warn(message: str) -> None:
    """A warning on stderr, once: torchrun's processes each check the same options, and only the first says so."""
    if torchrun_part().index == 0:
        console.print(f"warning: {message}", soft_wrap=True)


def print_json(data) -> None:
    """A machine-readable result on stdout, as it is: no wrapping, no markup."""
    results.out(json.dumps(data, indent=2), highlight=False)


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


@dataclass(frozen=True)
class Part:
    """Process `index` of `count`: it owns every `count`-th work item, starting at `index`."""

    index: int = 0
    count: int = 1

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_part(text: str) -> Part:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise UserError(f"--part must be i/n with 0 <= i < n (e.g. 0/4), got '{text}'")
    return Part(int(match[1]), int(match[2]))


def torchrun_part() -> Part:
    """This process's rank and the world size when started by torchrun; Part(0, 1) otherwise."""
    return Part(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))
