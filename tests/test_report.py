"""Runs over several seeds: `richkd evaluate` over a glob of checkpoints."""

from __future__ import annotations

import json
import shutil

import torch
from test_bad_input import assert_user_error

from richkd.pipeline.cli import run_cli


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
    (runs / "y" / "seed-11" / "checkpoints").mkdir(parents=True)
    torch.save(payload, runs / "y" / "seed-11" / "checkpoints" / "last.pt")
    assert_user_error([*evaluate, "--checkpoint", str(runs / "*" / "seed-1*" / "checkpoints" / "last.pt")], capsys,
                      "were trained on different views", "evaluate them separately")
