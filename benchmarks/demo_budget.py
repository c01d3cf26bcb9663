"""What bounds the demo's wall time: the import every stage pays, and the cost of one student SGD step.

The demo's students (params.yaml: `students` x `distill.seeds`) take a fixed number of SGD steps each, set
by the plateau (cross-entropy needs about 3,400 steps on this task whatever the labelled set, docs/demo.md).
So their wall time is at least steps x seconds per step / cores, and no schedule or loader change beats
it. This prints, measured on this machine:

- the seconds `import richkd.cli` takes in a fresh interpreter (every `richkd` command pays it once);
- milliseconds per SGD step (forward, backward, the default SGD step; the median of 300 steps) of the
  demo's student on one thread, at the demo's batch and image side, and of a half-width student and smaller images;
- the lower bound this puts on the students' wall time: total steps x ms per step / cores.

    python benchmarks/demo_budget.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from stream_scale import student_step_seconds

from richkd.pipeline.config import build_config, read_params_section
from richkd.pipeline.demo import CLASS_NAMES
from richkd.pipeline.models.cifar_resnet import CifarResNet
from richkd.pipeline.models.zoo import NARROW
from richkd.pipeline.seeding import holdout_split
from richkd.stages.distill import DistillConfig

WARMUP_STEPS, MEASURED_STEPS = 40, 300


def import_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import richkd.cli"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    demo = read_params_section(args.params, "demo")
    distill = build_config(DistillConfig, "distill", args.params)
    students = read_params_section(args.params, "students")
    seeds = distill.seed_list()
    if distill.arch != "resnet8":
        raise SystemExit(f"this benchmark times resnet8 students; {args.params} trains {distill.arch}")
    trained, _ = holdout_split(demo["train"], distill.val_fraction, distill.seed)
    steps_per_epoch = math.ceil(len(trained) / distill.batch_size)
    total_steps = sum(student["epochs"] for student in students.values()) * len(seeds) * steps_per_epoch
    cores = os.cpu_count()
    torch.set_num_threads(1)

    print(f"import richkd.cli: {import_seconds():.1f} s (paid once by each richkd command)")
    print(f"students: {len(students)} x {len(seeds)} seeds, {total_steps:,} SGD steps in all "
          f"({steps_per_epoch} a epoch at batch {distill.batch_size}); {cores} cores")
    print("| student | image side | ms per step (1 thread) | students' wall time at least |")
    print("|---|---:|---:|---:|")
    half = tuple(width // 2 for width in NARROW)
    for name, widths, side in (("resnet8 (the demo's)", NARROW, demo["side"]), ("resnet8, half width", half,
                               demo["side"]), ("resnet8", NARROW, demo["side"] * 3 // 4),
                               ("resnet8", NARROW, demo["side"] // 2)):
        steps = student_step_seconds(CifarResNet(8, widths, len(CLASS_NAMES)), len(CLASS_NAMES),
                                     distill.batch_size, side, WARMUP_STEPS, MEASURED_STEPS)
        milliseconds = statistics.median(steps) * 1000
        print(f"| {name} | {side} | {milliseconds:.1f} | {total_steps * milliseconds / 1000 / cores / 60:.1f} min |")


if __name__ == "__main__":
    main()
