"""What a richkd DVC pipeline costs: run `dvc repro` on it and print the wall time of every stage, by kind.

The demo (`dvc.yaml`) and the study (`study/dvc.yaml`) are chains of `richkd` commands; this runs one as a user
does, passes DVC's output through, and times each stage from the moment DVC starts it to the moment it starts
the next (or finishes). Stages are grouped by their name before `@` (DVC's foreach), so the students' 24 distill
stages show as one row. It also prints the students' SGD steps from the params and what they cost a step on
average, so that the cost on another machine (`--device cuda`) can be estimated from its own step time.

    python benchmarks/pipeline_cost.py study/dvc.yaml [--force]

Run it from a clone's root, with `richkd` and `dvc` on the PATH (the README's install).
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def timed_repro(pipeline: Path, force: bool) -> tuple[list[tuple[str, float]], int]:
    """(stage, seconds) of every stage `dvc repro` runs, in order, and its exit status."""
    command = ["dvc", "repro", *(["--force"] if force else []), str(pipeline)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stages: list[tuple[str, float]] = []
    current, started = None, time.perf_counter()
    for line in process.stdout:
        sys.stdout.write(line)
        match = STAGE_LINE.search(line)
        if match:
            now = time.perf_counter()
            if current is not None:
                stages.append((current, now - started))
            current, started = match[1], now
    status = process.wait()
    if current is not None:
        stages.append((current, time.perf_counter() - started))
    return stages, status


def student_steps(params: dict) -> int:
    """SGD steps of every student run of the params (the label-only run included), over all seeds."""
    distill = params["distill"]
    samples = params["demo"]["train"]
    trained = samples - round(samples * distill.get("val_fraction", 0.1))
    steps_per_epoch = math.ceil(trained / distill["batch_size"])
    seeds = len(str(distill["seeds"]).split(","))
    runs = [*params.get("students", {}).values(), *([params["label_only"]] if "label_only" in params else [])]
    return sum(run["epochs"] for run in runs) * steps_per_epoch * seeds


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", nargs="?", default="dvc.yaml", type=Path, help="dvc.yaml of the pipeline")
    parser.add_argument("--force", action="store_true", help="run every stage, even those DVC finds up to date")
    args = parser.parse_args()
    started = time.perf_counter()
    stages, status = timed_repro(args.pipeline, args.force)
    total = time.perf_counter() - started
    groups: dict[str, list[float]] = {}
    for name, seconds in stages:
        # DVC names a stage of a pipeline outside the root "study/dvc.yaml:distill@kd"
        groups.setdefault(name.rpartition(":")[2].split("@")[0], []).append(seconds)
    print(f"\n{args.pipeline}: dvc repro took {minutes(total)} (exit status {status}), {len(stages)} stages")
    print("| stage | runs | wall time | share |")
    print("|---|---:|---:|---:|")
    for name, times in groups.items():
        print(f"| {name} | {len(times)} | {minutes(sum(times))} | {100 * sum(times) / total:.0f}% |")
    params = yaml.safe_load((args.pipeline.parent / "params.yaml").read_text())
    steps = student_steps(params)
    distill_seconds = sum(groups.get("distill", [])) + sum(groups.get("label_only", []))
    if steps and distill_seconds:
        print(f"students: {steps:,} SGD steps of batch {params['distill']['batch_size']} over all runs and seeds, "
              f"{1000 * distill_seconds / steps:.1f} ms of wall time a step on this machine (start-up and "
              "evaluation of the held-out split included); on another device, students take about steps x its "
              "ms a step / the runs it trains at once")
    sys.exit(status)


if __name__ == "__main__":
    main()
