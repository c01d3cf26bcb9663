"""RichKD-F (CRD on fused features) on the demo, with CRD's own schedule and with the demo's delayed start.

CRD's memory bank starts as random vectors and each row is refreshed once an epoch with momentum 0.5, so in
epoch e a sample's positive is still 0.5^e random: at 240 epochs that is nothing, in a 20-epoch run the first
epochs pull the student towards noise. Delaying the feature loss (`--feature-start-epoch`) lets the bank fill
with real embeddings first; `--feature-warmup-epochs` then ramps the loss in.

Trains the cross-entropy student and F with each schedule for every seed, from the demo's cache (run
`dvc repro precompute` first), and prints top-1 on the test split: mean, the Student-t 95% interval over seeds,
and the paired difference against cross-entropy (same seed, same data order).

    python benchmarks/feature_warmup.py [--params params.yaml] [--seeds 0,1,2] [--out runs/feature_warmup]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from richkd.cli import run_cli
from richkd.pipeline.config import read_params_section
from richkd.stages.report import estimate

SCHEDULES = {
    "ce (no feature loss)": ["--variant", "none"],
    "F, CRD's schedule (start 0, no ramp)": ["--variant", "F", "--feature-start-epoch", "0",
                                             "--feature-warmup-epochs", "0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/feature_warmup")
    args = parser.parse_args()
    demo = read_params_section(args.params, "distill")
    schedules = {**SCHEDULES, f"F, the demo's (start {demo['feature_start_epoch']}, ramp "
                              f"{demo['feature_warmup_epochs']})": [
        "--variant", "F", "--feature-start-epoch", str(demo["feature_start_epoch"]),
        "--feature-warmup-epochs", str(demo["feature_warmup_epochs"])]}
    top1 = {}
    for index, (name, flags) in enumerate(schedules.items()):
        out = Path(args.out) / f"schedule-{index}"
        status = run_cli(["distill", "--config", args.params, *flags, "--epochs", str(demo["epochs"]),
                          "--seeds", args.seeds, "--out", str(out), "--overwrite"])
        if status:
            raise SystemExit(status)
        top1[name] = [json.loads((out / f"seed-{seed}" / "summary.json").read_text())["last"]["test"]["top1"]
                      for seed in args.seeds.split(",")]
    baseline = top1[next(iter(schedules))]
    print(f"\ntop-1 on the test split, {len(baseline)} seeds, {demo['epochs']} epochs (mean, 95% interval):")
    print("| schedule | top-1 | vs ce (paired) |\n|---|---:|---:|")
    for name, values in top1.items():
        own = estimate(values)
        paired = estimate([value - base for value, base in zip(values, baseline)])
        print(f"| {name} | {interval_text(own)} | {interval_text(paired, signed=True)} |")


def interval_text(value: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    low, high = value["ci95"]
    return f"{100 * value['mean']:{sign}.1f}% [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


if __name__ == "__main__":
    main()
