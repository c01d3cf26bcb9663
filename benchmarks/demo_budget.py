"""What bounds the demo's wall time: the import every stage pays, and the cost of one student SGD step.

The demo's students (params.yaml: `students` x `distill.seeds`) take a fixed number of SGD steps each, set
by the plateau (cross-entropy needs about 3,400 steps on this task whatever the labelled set, docs/demo.md).
So their wall time is at least steps x seconds per step / cores, and no schedule or loader change beats
it. This prints, measured on this machine:

- the seconds `import richkd.cli` takes in a fresh interpreter (every `richkd` command pays it once);
- milliseconds per SGD step (forward, backward, SGD with momentum and weight decay) of the demo's student
  on one thread, at the demo's batch and image side, and of a half-width student and smaller images;
- the lower bound this puts on the students' wall time: total steps x ms per step / cores.

    python benchmarks/demo_budget.py [--params params.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from richkd.pipeline.config import field_default, read_params_section
from richkd.pipeline.demo import CLASS_NAMES
from richkd.pipeline.models.cifar_resnet import CifarResNet
from richkd.pipeline.models.zoo import NARROW
from richkd.stages.distill import DistillConfig

MEASURED_STEPS, WARMUP_STEPS = 120, 40


def import_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import richkd.cli"], check=True)
    return time.perf_counter() - started


def step_milliseconds(widths: tuple[int, ...], side: int, batch_size: int, classes: int, repeats: int) -> float:
    """The fastest of `repeats` timings of one SGD step of a channels-last resnet8 (as the Trainer runs it)."""
    timings = []
    for _ in range(repeats):
        torch.manual_seed(0)
        model = CifarResNet(8, widths, classes).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        x = torch.randn(batch_size, 3, side, side).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, classes, (batch_size,))
        for step in range(WARMUP_STEPS + MEASURED_STEPS):
            if step == WARMUP_STEPS:
                started = time.perf_counter()
            logits, _ = model(x)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        timings.append((time.perf_counter() - started) / MEASURED_STEPS * 1000)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    demo = read_params_section(args.params, "demo")
    distill = {**{f.name: field_default(f) for f in dataclasses.fields(DistillConfig)},
               **read_params_section(args.params, "distill")}
    students = read_params_section(args.params, "students")
    seeds = len(str(distill["seeds"]).split(","))
    if distill["arch"] != "resnet8":
        raise SystemExit(f"this benchmark times resnet8 students; {args.params} trains {distill['arch']}")
    trained = math.floor(demo["train"] * (1 - distill["val_fraction"]))
    steps_per_epoch = math.ceil(trained / distill["batch_size"])
    total_steps = sum(student["epochs"] for student in students.values()) * seeds * steps_per_epoch
    cores = os.cpu_count()
    torch.set_num_threads(1)

    print(f"import richkd.cli: {import_seconds():.1f} s (paid once by each richkd command)")
    print(f"students: {len(students)} x {seeds} seeds, {total_steps:,} SGD steps in all "
          f"({steps_per_epoch} a epoch at batch {distill['batch_size']}); {cores} cores")
    print("| student | image side | ms per step (1 thread) | students' wall time at least |")
    print("|---|---:|---:|---:|")
    half = tuple(width // 2 for width in NARROW)
    for name, widths, side in (("resnet8 (the demo's)", NARROW, demo["side"]), ("resnet8, half width", half,
                               demo["side"]), ("resnet8", NARROW, demo["side"] * 3 // 4),
                               ("resnet8", NARROW, demo["side"] // 2)):
        milliseconds = step_milliseconds(widths, side, distill["batch_size"], len(CLASS_NAMES),
                                          args.repeats)
        print(f"| {name} | {side} | {milliseconds:.1f} | {total_steps * milliseconds / 1000 / cores / 60:.1f} min |")


if __name__ == "__main__":
    main()
