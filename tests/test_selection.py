"""Checkpoint selection never sees the test split, and --seeds trains one run per seed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from PIL import Image

from richkd.cli import run_cli
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.demo import write_demo
from richkd.pipeline.models import read_checkpoint

TRAIN = ["train", "--dataset", "demo", "--arch", "resnet8", "--epochs", "3", "--batch-size", "32",
         "--schedule", "cosine", "--num-workers", "0", "--device", "cpu"]


def test_best_checkpoint_is_chosen_on_validation_samples_never_on_the_test_split(tmp_path):
    write_demo(tmp_path / "real", train=160, test=40)
    # The same training images beside a test split of noise with its labels shuffled.
    shutil.copytree(tmp_path / "real", tmp_path / "noise")
    rng = np.random.default_rng(0)
    for path in sorted((tmp_path / "noise" / "test").rglob("*.png")):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    runs = {}
    for name in ("real", "noise"):
        assert run_cli([*TRAIN, "--data-root", str(tmp_path / name), "--val-fraction", "0.25",
                        "--out", str(tmp_path / f"run_{name}")]) == 0
        runs[name] = tmp_path / f"run_{name}"
    best = {name: read_checkpoint(run / "checkpoints" / "best.pt") for name, run in runs.items()}
    assert best["real"][1]["best"] == best["noise"][1]["best"]
    assert best["real"][1]["best"]["selected_on"] == "validation"
    assert all(torch.equal(best["real"][0][key], best["noise"][0][key]) for key in best["real"][0])
    summaries = {name: json.loads((run / "summary.json").read_text()) for name, run in runs.items()}
    assert summaries["real"]["last"]["test"] != summaries["noise"]["last"]["test"]  # the test split is reported

    validation = json.loads((runs["real"] / "validation.json").read_text())
    train_keys = open_dataset("demo", tmp_path / "real", "train").keys
    assert validation["count"] == 40 and validation["fraction"] == 0.25 and validation["seed"] == 0
    assert set(validation["keys"]) < set(train_keys)


def test_seeds_train_one_run_per_seed_each_as_a_single_seed_run_would(tmp_path):
    write_demo(tmp_path / "data", train=96, test=16)
    common = [*TRAIN, "--epochs", "1", "--data-root", str(tmp_path / "data")]
    assert run_cli([*common, "--seeds", "3,1", "--out", str(tmp_path / "seeded")]) == 0
    assert run_cli([*common, "--seed", "1", "--out", str(tmp_path / "single")]) == 0
    assert sorted(path.name for path in (tmp_path / "seeded").iterdir()) == ["seed-1", "seed-3"]
    one, saved = read_checkpoint(tmp_path / "seeded" / "seed-1" / "checkpoints" / "last.pt")
    single, _ = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    assert saved["config"]["seed"] == 1 and saved["config"]["seeds"] is None
    assert all(torch.equal(one[key], single[key]) for key in one)
    three, _ = read_checkpoint(tmp_path / "seeded" / "seed-3" / "checkpoints" / "last.pt")
    assert not torch.equal(three["fc.weight"], one["fc.weight"])


def test_seeds_trained_at_once_each_match_a_single_seed_run_on_their_share_of_the_threads(tmp_path, capfd):
    write_demo(tmp_path / "data", train=96, test=16)
    common = [*TRAIN, "--epochs", "1", "--data-root", str(tmp_path / "data")]
    threads = torch.get_num_threads()
    assert run_cli([*common, "--seeds", "3,1", "--jobs", "2", "--out", str(tmp_path / "parallel")]) == 0
    assert "seed 1, epoch 1/1: loss" in capfd.readouterr().err  # from the worker process
    torch.set_num_threads(max(1, threads // 2))
    try:
        assert run_cli([*common, "--seed", "1", "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    parallel, _ = read_checkpoint(tmp_path / "parallel" / "seed-1" / "checkpoints" / "last.pt")
    single, _ = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    assert all(torch.equal(parallel[key], single[key]) for key in parallel)
    assert json.loads((tmp_path / "parallel" / "seed-3" / "summary.json").read_text())["epochs"] == 1


def test_a_validation_share_that_leaves_nothing_to_train_on_is_refused(tmp_path, capsys):
    write_demo(tmp_path / "data", train=2, test=2)
    assert run_cli([*TRAIN, "--data-root", str(tmp_path / "data"), "--val-fraction", "0.9",
                    "--out", str(tmp_path / "run")]) == 2
    assert "--val-fraction 0.9 leaves no training sample of 2" in capsys.readouterr().err


def test_evaluate_matches_classes_by_name_whatever_folders_the_split_has(tmp_path, capsys):
    write_demo(tmp_path / "data", train=64, test=48)
    run = tmp_path / "run"
    assert run_cli([*TRAIN, "--epochs", "1", "--data-root", str(tmp_path / "data"), "--out", str(run)]) == 0
    evaluate = ["evaluate", "--dataset", "imagefolder", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                "--split", "test", "--num-workers", "0", "--device", "cpu", "--json"]
    capsys.readouterr()
    assert run_cli([*evaluate, "--data-root", str(tmp_path / "data")]) == 0
    whole = json.loads(capsys.readouterr().out)["per_class_accuracy"]
    # Without the first class's folder every other class sorts one place earlier: labels must follow the names.
    shutil.copytree(tmp_path / "data" / "test", tmp_path / "fewer" / "test")
    first = sorted(whole)[0]
    assert len({accuracy for name, accuracy in whole.items() if name != first}) > 1  # so a shift would show
    shutil.rmtree(tmp_path / "fewer" / "test" / first)
    assert run_cli([*evaluate, "--data-root", str(tmp_path / "fewer")]) == 0
    fewer = json.loads(capsys.readouterr().out)["per_class_accuracy"]
    assert fewer == {**whole, first: None}
    (tmp_path / "fewer" / "test" / "zebra").mkdir()
    shutil.copy(next((tmp_path / "fewer" / "test").rglob("*.png")), tmp_path / "fewer" / "test" / "zebra")
    assert run_cli([*evaluate, "--data-root", str(tmp_path / "fewer")]) == 2
    assert (f"imagefolder / test has classes that checkpoint {tmp_path / 'run' / 'checkpoints' / 'last.pt'} was "
            "not trained on: zebra") in " ".join(capsys.readouterr().err.split())
