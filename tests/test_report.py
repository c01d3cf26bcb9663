"""Runs over several seeds: `richkd evaluate` over a glob of checkpoints, and `richkd report`'s means, Student-t
intervals and paired differences, checked against numbers computed here."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import zarr
from test_bad_input import assert_user_error

from richkd.cli import run_cli
from richkd.stages.report import estimate, paired_estimates

# Student-t quantiles t(0.975, n - 1), from a table: the tests do not compute what they check.
T_975 = {2: 12.706204736174707, 3: 4.302652729911275}
METRICS = ("top1", "top5", "nll", "ece", "confident_correct", "confidently_wrong")


def expected_estimate(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return {"mean": pytest.approx(mean), "ci95": None, "n_seeds": 1}
    half_width = T_975[len(values)] * np.std(values, ddof=1) / math.sqrt(len(values))
    return {"mean": pytest.approx(mean), "ci95": pytest.approx([mean - half_width, mean + half_width]),
            "n_seeds": len(values)}


def test_interval_is_the_student_t_interval_over_seeds():
    values = [0.80, 0.82, 0.87]
    result = estimate(values)
    half_width = 4.302652729911275 * np.std(values, ddof=1) / math.sqrt(3)
    assert result["mean"] == pytest.approx(0.83) and result["n_seeds"] == 3
    assert result["ci95"] == pytest.approx([0.83 - half_width, 0.83 + half_width])
    assert estimate([0.5, 0.7]) == expected_estimate([0.5, 0.7])
    assert estimate([0.8]) == {"mean": 0.8, "ci95": None, "n_seeds": 1}


def evaluation(seed: int | None, top1: float, nll: float = 1.0, robustness: tuple[float, float] | None = None) -> dict:
    """The part of a `richkd evaluate` result the report reads; with robustness (clean, corrupted top-1) when
    given, measured on one corruption at one severity."""
    result = {"seed": seed, "top1": top1, "top5": min(1.0, top1 + 0.1), "nll": nll, "ece": 0.1 * nll,
              "confident_correct": 0.5 * top1, "confidently_wrong": 0.05 * nll}
    if robustness is not None:
        clean, corrupted = robustness
        result["robustness"] = {
            "source": "generated", "parameters": "cifar", "seed": 0, "samples": 20, "corruptions": ["fog"],
            "severities": [1], "clean_top1": clean, "mean_corruption_accuracy": corrupted,
            "relative_drop": (clean - corrupted) / clean, "corruption_mean_top1": {"fog": corrupted},
            "severity_mean_top1": {"1": corrupted},
            "cells": {"fog": {"1": {"top1": corrupted, "nll": 2.0, "ece": 0.2}}},
        }
    return result


def test_paired_differences_are_taken_seed_by_seed():
    runs = {
        "baseline": [evaluation(seed, top1) for seed, top1 in ((0, 0.5), (1, 0.25), (2, 0.125))],
        # Listed in another order: pairs are matched by seed, not by position.
        "constant": [evaluation(seed, top1) for seed, top1 in ((2, 0.375), (0, 0.75), (1, 0.5))],
        "one_shared_seed": [evaluation(1, 0.5), evaluation(7, 0.9)],
    }
    constant = paired_estimates(runs, "constant", "baseline")
    assert constant["top1"] == {"mean": 0.25, "ci95": [0.25, 0.25], "n_seeds": 3}
    assert constant["nll"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n_seeds": 3}
    assert "mean_corruption_accuracy" not in constant
    assert paired_estimates(runs, "one_shared_seed", "baseline")["top1"] == {"mean": 0.25, "ci95": None, "n_seeds": 1}


# Three seeds of each student; each file lists them in its own order.
STUDENTS = {
    "kd": {0: (0.70, 1.10), 1: (0.72, 1.00), 2: (0.75, 0.95)},
    "teacher_shrink": {2: (0.74, 0.90), 0: (0.71, 1.05), 1: (0.74, 1.02)},
    "richkd_L": {1: (0.77, 0.93), 2: (0.81, 0.86), 0: (0.76, 0.97)},
}


def write_evaluations(folder) -> None:
    folder.mkdir()
    for name, seeds in STUDENTS.items():
        results = [evaluation(seed, top1, nll, robustness=(top1, top1 - 0.2 - 0.01 * seed))
                   for seed, (top1, nll) in seeds.items()]
        (folder / f"{name}.json").write_text(json.dumps({"seeds": results}))
    (folder / "teacher.json").write_text(json.dumps(evaluation(None, 0.9, 0.5)))


def test_report_groups_seeds_and_compares_with_the_baselines(tmp_path, capsys):
    write_evaluations(tmp_path / "evals")
    out = tmp_path / "report"
    capsys.readouterr()
    assert run_cli(["report", "--evals", str(tmp_path / "evals"), "--out", str(out), "--json"]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    assert "report written" not in printed.err
    assert summary == json.loads((out / "metrics.json").read_text())
    assert list(summary) == ["splits"] and list(summary["splits"]) == ["test"]
    summary = summary["splits"]["test"]
    assert list(summary) == ["runs", "paired"]
    assert list(summary["runs"]) == ["teacher", "kd", "richkd_L", "teacher_shrink"]

    per_seed = {name: {seed: evaluation(seed, top1, nll, robustness=(top1, top1 - 0.2 - 0.01 * seed))
                       for seed, (top1, nll) in seeds.items()} for name, seeds in STUDENTS.items()}

    def value(result: dict, key: str) -> float:
        return result["robustness"][key] if key in ("mean_corruption_accuracy", "relative_drop") else result[key]

    keys = (*METRICS, "mean_corruption_accuracy", "relative_drop")
    for name, seeds in per_seed.items():
        assert summary["runs"][name] == {key: expected_estimate([value(seeds[s], key) for s in (0, 1, 2)])
                                         for key in keys}
    teacher = evaluation(None, 0.9, 0.5)
    assert summary["runs"]["teacher"] == {key: {"mean": teacher[key], "ci95": None, "n_seeds": 1} for key in METRICS}
    assert "superclass_share" not in summary["paired"]["richkd_L-vs-kd"]

    assert list(summary["paired"]) == ["kd-vs-teacher_shrink", "richkd_L-vs-kd", "richkd_L-vs-teacher_shrink"]
    for baseline in ("kd", "teacher_shrink"):
        paired = summary["paired"][f"richkd_L-vs-{baseline}"]
        for key in keys:
            differences = [value(per_seed["richkd_L"][s], key) - value(per_seed[baseline][s], key) for s in (0, 1, 2)]
            assert paired[key] == expected_estimate(differences), (baseline, key)
    # 0.77 - 0.72 at seed 1: a difference of +5.0 points, which a wrong pairing (by position) would not give.
    assert summary["paired"]["richkd_L-vs-kd"]["top1"]["mean"] == pytest.approx((0.06 + 0.05 + 0.06) / 3)

    text = (out / "report.md").read_text()
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    richkd = summary["runs"]["richkd_L"]["top1"]
    half_width = (richkd["ci95"][1] - richkd["ci95"][0]) / 2
    assert lines["| richkd_L"].startswith(f"| richkd_L | {100 * richkd['mean']:.1f} ± {100 * half_width:.1f}% |")
    assert lines["| richkd_L"].endswith(" | 3 |") and lines["| *teacher*"].startswith("| *teacher* | 90.0% |")
    assert "## Paired differences" in text
    assert "Student-t 95% interval over seeds (n-1 degrees of freedom) of the per-seed difference; an interval " \
           "that excludes 0 is a difference at the 5% level" in text
    paired = summary["paired"]["richkd_L-vs-kd"]["top1"]
    low, high = (100 * bound for bound in paired["ci95"])
    assert low > 0, "the data above make richkd_L better than kd at every seed"
    assert lines["| richkd_L vs kd"].startswith(f"| richkd_L vs kd | 3 | **{100 * paired['mean']:+.1f} "
                                                f"[{low:+.1f}, {high:+.1f}]%** |")
    assert lines["| kd vs teacher_shrink"].startswith("| kd vs teacher_shrink | 3 | -0.7 [")
    assert "| run vs baseline | n | top-1 | NLL | ECE | confident-correct | confidently-wrong | mean corruption " \
           "accuracy |" in text
    assert (out / "paired_differences.png").stat().st_size > 10_000
    assert "## Robustness" in text and lines["| **mean corruption accuracy**"].count(" ± ") == 3

    # Without --json: nothing on stdout, where the report is on the console.
    assert run_cli(["report", "--evals", str(tmp_path / "evals"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and "report written to" in printed.err


def test_explicit_pairs_and_their_errors(tmp_path, capsys):
    evals = tmp_path / "evals"
    write_evaluations(evals)
    (evals / "ce.json").write_text(json.dumps({"seeds": [evaluation(0, 0.6), evaluation(1, 0.62)]}))
    (evals / "ce_long.json").write_text(json.dumps({"seeds": [evaluation(1, 0.64), evaluation(2, 0.66)]}))
    report = ["report", "--evals", str(evals), "--out", str(tmp_path / "report"), "--json"]
    capsys.readouterr()
    assert run_cli([*report, "--pairs", "ce_long-vs-ce", "--baselines", "kd"]) == 0
    paired = json.loads(capsys.readouterr().out)["splits"]["test"]["paired"]
    assert paired["ce_long-vs-ce"]["top1"] == {"mean": pytest.approx(0.02), "ci95": None, "n_seeds": 1}
    assert "richkd_L-vs-kd" in paired and "richkd_L-vs-teacher_shrink" not in paired

    for entry in ("richkd_L-vs-nowhere", "richkd_L", "kd-vs-ce-vs-ce_long"):
        assert_user_error([*report, "--pairs", entry], capsys, f"--pairs entry '{entry}' must be X-vs-B with X and B "
                          "runs of the report: teacher, ce, ce_long, kd, richkd_L, teacher_shrink")
    (evals / "ce_seed_5.json").write_text(json.dumps(evaluation(5, 0.6)))
    assert_user_error([*report, "--runs", "ce_seed_5", "--runs", "ce_long", "--pairs", "ce_seed_5-vs-ce_long"],
                      capsys, "runs ce_seed_5 (seeds 5) and ce_long (seeds 1, 2) share no seed: a paired difference "
                      "needs the same seeds")


def test_evaluate_every_seed_of_a_run_in_one_process(tiny_world, tmp_path, capsys):
    runs = tmp_path / "runs"
    # Seeds 2 and 10: sorted by path, seed-10 comes first; the results come by seed.
    for seed in (2, 10):
        assert run_cli(["train", "--data-root", str(tiny_world.data_root), "--arch", "resnet8", "--epochs", "1",
                        "--batch-size", "16", "--num-workers", "0", "--device", "cpu", "--seed", str(seed),
                        "--out", str(runs / "x" / f"seed-{seed}")]) == 0
    evaluate = ["evaluate", "--data-root", str(tiny_world.data_root), "--num-workers", "0", "--device", "cpu",
                "--batch-size", "8"]
    pattern = str(runs / "x" / "seed-*" / "checkpoints" / "last.pt")
    output = tmp_path / "evals" / "x.json"
    capsys.readouterr()
    assert run_cli([*evaluate, "--checkpoint", pattern, "--json", "--output", str(output)]) == 0
    grouped = json.loads(capsys.readouterr().out)
    assert grouped == json.loads(output.read_text()) and list(grouped) == ["seeds"]
    assert [result["seed"] for result in grouped["seeds"]] == [2, 10]
    assert grouped["seeds"][0]["checkpoint"] == str(runs / "x" / "seed-2" / "checkpoints" / "last.pt")
    assert grouped["seeds"][0]["nll"] != grouped["seeds"][1]["nll"]  # two initialisations, two models
    for result in grouped["seeds"]:
        assert run_cli([*evaluate, "--checkpoint", result["checkpoint"], "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == result
    assert run_cli([*evaluate, "--checkpoint", pattern]) == 0
    tables = capsys.readouterr().out
    assert "resnet8 seed 2 on cifar100 / test" in tables and "resnet8 seed 10 on cifar100 / test" in tables

    assert_user_error([*evaluate, "--checkpoint", str(runs / "nowhere-*" / "last.pt")], capsys,
                      f"no checkpoint matches {runs / 'nowhere-*' / 'last.pt'}")
    shutil.copytree(runs / "x" / "seed-2", runs / "x" / "again-2")
    assert_user_error([*evaluate, "--checkpoint", str(runs / "x" / "*" / "checkpoints" / "last.pt")], capsys,
                      f"checkpoints {runs / 'x' / 'again-2' / 'checkpoints' / 'last.pt'} and "
                      f"{runs / 'x' / 'seed-2' / 'checkpoints' / 'last.pt'} both have seed 2: evaluate each seed of a "
                      "run once")
    for copy in ("a", "b"):  # mdistiller's format records no seed
        shutil.copy(tiny_world.teacher_checkpoint, runs / f"teacher-{copy}.pth")
    assert_user_error([*evaluate, "--checkpoint", str(runs / "teacher-*.pth")], capsys,
                      "both record no seed: evaluate each seed of a run once")
    payload = torch.load(runs / "x" / "seed-10" / "checkpoints" / "last.pt", weights_only=True)
    payload["config"]["seed"] = 11
    payload["view_policy"] = {**payload["view_policy"], "padding": 2}
    del payload["crc32c"]  # edited: no longer the contents richkd's checksum was computed over
    (runs / "y" / "seed-11" / "checkpoints").mkdir(parents=True)
    torch.save(payload, runs / "y" / "seed-11" / "checkpoints" / "last.pt")
    assert_user_error([*evaluate, "--checkpoint", str(runs / "*" / "seed-1*" / "checkpoints" / "last.pt")], capsys,
                      "were trained on different views", "evaluate them separately")


def test_target_rows_from_the_test_cache_are_single_values_and_never_paired(tiny_world, tmp_path, capsys):
    cache = tmp_path / "test.zarr"
    assert run_cli(tiny_world.precompute_args(cache, "--split", "test", "--views", "1", "--view-policy", "center")) == 0
    write_evaluations(tmp_path / "evals")
    capsys.readouterr()
    assert run_cli(["report", "--evals", str(tmp_path / "evals"), "--test-cache", str(cache),
                    "--out", str(tmp_path / "report"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["splits"]["test"]
    assert list(summary["runs"]) == ["teacher", "CLIP zero-shot (12 prompts)", "fused targets (alpha 0.7, raw)",
                                     "kd", "richkd_L", "teacher_shrink"]
    for name in ("CLIP zero-shot (12 prompts)", "fused targets (alpha 0.7, raw)"):
        assert set(summary["runs"][name]) == set(METRICS)
        assert all(value["ci95"] is None and value["n_seeds"] == 1 for value in summary["runs"][name].values())
    assert list(summary["paired"]) == ["kd-vs-teacher_shrink", "richkd_L-vs-kd", "richkd_L-vs-teacher_shrink"]
    assert "| *CLIP zero-shot (12 prompts)* |" in (tmp_path / "report" / "report.md").read_text()


def study_evaluation(seed: int, top1: float, split: str, variant: str, alpha: float) -> dict:
    return {**evaluation(seed, top1), "split": split, "superclass_share": 0.2 + top1 / 10,
            "training": {"variant": variant, "alpha": alpha, "clip_scale": "clip", "epochs": 10}}


def test_baselines_named_by_each_students_settings_on_every_split(tmp_path, capsys):
    runs = {"kd": ("L", 1.0, 0.70), "shrink_0.3": ("shrink", 0.3, 0.72), "shrink_0.5": ("shrink", 0.5, 0.71),
            "L_0.3": ("L", 0.3, 0.76), "L_0.5": ("L", 0.5, 0.74)}
    for split, shift in (("test", 0.0), ("shifted", -0.2)):
        (tmp_path / split).mkdir()
        for name, (variant, alpha, top1) in runs.items():
            seeds = [study_evaluation(seed, top1 + shift + 0.01 * seed * (name == "L_0.3"), split, variant, alpha)
                     for seed in (0, 1, 2)]
            (tmp_path / split / f"{name}.json").write_text(json.dumps({"seeds": seeds}))
    out = tmp_path / "report"
    capsys.readouterr()
    assert run_cli(["report", "--evals", str(tmp_path / "test"), "--evals", str(tmp_path / "shifted"),
                    "--baselines", "kd", "--baselines", "shrink_{alpha}", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["splits"]) == ["test", "shifted"]
    for split, shift in (("test", 0.0), ("shifted", -0.2)):
        paired = summary["splits"][split]["paired"]
        # Each L against kd and the shrink control of its own alpha, never another alpha's.
        assert list(paired) == ["L_0.3-vs-kd", "L_0.3-vs-shrink_0.3", "L_0.5-vs-kd", "L_0.5-vs-shrink_0.5",
                                "shrink_0.3-vs-kd", "shrink_0.5-vs-kd"]
        assert paired["L_0.3-vs-shrink_0.3"]["top1"] == expected_estimate([0.04, 0.05, 0.06])
        assert paired["L_0.5-vs-shrink_0.5"]["superclass_share"]["mean"] == pytest.approx(0.003)
        assert summary["splits"][split]["runs"]["kd"]["top1"]["mean"] == pytest.approx(0.70 + shift)
    text = (out / "report.md").read_text()
    assert "## test" in text and "## shifted" in text and text.count("### Paired differences") == 2
    assert "| run | top-1 | top-5 | NLL | ECE | confident-correct | confidently-wrong | superclass share | n |" in text
    for figure in ("paired_differences.png", "paired_differences_shifted.png", "accuracy_shifted.png"):
        assert f"]({figure})" in text and (out / figure).stat().st_size > 10_000

    (tmp_path / "test" / "mixed.json").write_text(json.dumps({"seeds": [
        study_evaluation(0, 0.5, "test", "L", 0.5), study_evaluation(1, 0.5, "shifted", "L", 0.5)]}))
    assert_user_error(["report", "--evals", str(tmp_path / "test"), "--out", str(out)], capsys,
                      f"evaluation {tmp_path / 'test' / 'mixed.json'} holds results of several splits (shifted, test)")
    (tmp_path / "test" / "mixed.json").unlink()
    shutil.copy(tmp_path / "test" / "kd.json", tmp_path / "shifted" / "kd.json")
    assert_user_error(["report", "--evals", str(tmp_path / "test"), "--evals", str(tmp_path / "shifted"),
                       "--out", str(out)], capsys, f"run kd has two evaluations of split test: "
                      f"{tmp_path / 'test' / 'kd.json'} and {tmp_path / 'shifted' / 'kd.json'}")


def test_preconditions_are_measured_on_the_targets_and_the_label_only_run(tiny_world, tmp_path, capsys):
    caches = {}
    for split in ("test", "train"):  # the tiny world has no shifted split: its train split stands in for one
        caches[split] = tmp_path / f"{split}.zarr"
        assert run_cli(tiny_world.precompute_args(caches[split], "--split", split, "--views", "1",
                                                  "--view-policy", "center")) == 0
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "ce.json").write_text(json.dumps({"seeds": [evaluation(0, 0.01), evaluation(1, 0.02)]}))
    report = ["report", "--evals", str(evals), "--test-cache", str(caches["test"]), "--test-cache",
              str(caches["train"]), "--alpha", "0.5", "--clip-scale", "clip", "--out", str(tmp_path / "report"),
              "--shifted-split", "train", "--label-only", "ce"]
    capsys.readouterr()
    assert run_cli([*report, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    quality = {split: summary["splits"][split]["runs"] for split in ("test", "train")}

    def top1(split: str, row: str) -> float:
        name = {"clip": "CLIP zero-shot (12 prompts)", "fused": "fused targets (alpha 0.5, clip)"}[row]
        return quality[split][name]["top1"]["mean"]

    group = zarr.open_group(caches["train"], mode="r")
    teacher_train = np.mean(group["teacher/logits"][0].astype(np.float32).argmax(1) == group["labels"][:])
    checks = {row["check"]: row for row in summary["preconditions"]}
    assert list(checks) == [
        "teacher top-1 on test", "teacher minus ce (mean over seeds), top-1 on test",
        "CLIP minus teacher, top-1 on train", "CLIP minus teacher, top-1 on test",
        "fused (alpha 0.5, clip) minus the better of teacher and CLIP, top-1 on train",
        "fused minus teacher, top-1 on test", "fused minus teacher, NLL on test", "fused minus teacher, NLL on train"]
    assert checks["CLIP minus teacher, top-1 on train"]["value"] == pytest.approx(top1("train", "clip") - teacher_train)
    gain = checks["fused (alpha 0.5, clip) minus the better of teacher and CLIP, top-1 on train"]
    assert gain["value"] == pytest.approx(top1("train", "fused") - max(teacher_train, top1("train", "clip")))
    assert gain["met"] == (gain["value"] >= 0.03)
    assert checks["teacher top-1 on test"]["met"] is False  # a random teacher of 100 classes: near 1%
    assert summary["splits"]["test"]["error_overlap"]["both_wrong"] > 0.5
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Preconditions of RichKD's regime" in text and "| teacher top-1 on test |" in text
    assert "Teacher and CLIP on the 20 images of the cache: both right" in text

    assert_user_error([*report, "--require-preconditions"], capsys, "of the 8 preconditions are not met (teacher top-1 "
                      "on test;", f"see {tmp_path / 'report' / 'report.md'}")
    assert (tmp_path / "report" / "report.md").exists()
    assert_user_error([*report[:-4], "--label-only", "ce"], capsys,
                      "--shifted-split and --label-only go together: the preconditions need both")
    assert_user_error([*report[:-2], "--label-only", "kd"], capsys,
                      "--label-only kd: no evaluation of that run on test")
    without_test_cache = [*report[:4], *report[6:]]
    assert_user_error(without_test_cache, capsys, "the preconditions need a --test-cache of an in-distribution split "
                      "besides the shifted one")
    assert_user_error([*report[:-4], "--shifted-split", "shifted", "--label-only", "ce"], capsys,
                      "--shifted-split shifted: the preconditions need a --test-cache of that split")
    assert_user_error([*report, "--test-cache", str(caches["test"])], capsys,
                      f"caches {caches['test']} and {caches['test']} are both of split test: give one a split")

    # Only what the preconditions are measured on, whatever else the evaluations hold and the comparisons ask for.
    write_evaluations(tmp_path / "students")
    shutil.copytree(tmp_path / "students", evals, dirs_exist_ok=True)
    assert run_cli([*report, "--preconditions-only", "--pairs", "kd-vs-teacher_shrink", "--json"]) == 0
    gate = json.loads(capsys.readouterr().out)
    assert gate["preconditions"] == summary["preconditions"]
    assert list(gate["splits"]["test"]["runs"]) == ["teacher", "CLIP zero-shot (12 prompts)",
                                                    "fused targets (alpha 0.5, clip)", "ce"]
    assert not gate["splits"]["test"]["paired"]

