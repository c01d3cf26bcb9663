"""The study in the paper's regime: its generated dataset and the superclass share, checked on the data and against
computations made here."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_bad_input import assert_user_error

from richkd.cli import run_cli
from richkd.pipeline.data import read_captions
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.demo import COLOURS, SHIFTED_COLOURS, STUDY_CLASS_NAMES, study_sample
from richkd.pipeline.errors import UserError
from richkd.pipeline.metrics import ClassificationMeter, read_superclasses


def pixel_share_near(images: np.ndarray, colours, distance: float = 45.0) -> float:
    """The share of the pixels of `images` (N, 3, H, W) within `distance` (RGB) of any of `colours`."""
    pixels = images.transpose(0, 2, 3, 1).reshape(-1, 3).astype(np.float64)
    near = np.zeros(len(pixels), dtype=bool)
    for name in colours:
        near |= np.linalg.norm(pixels - np.array(COLOURS[name]), axis=1) < distance
    return float(near.mean())


def split_images(root, split: str) -> np.ndarray:
    dataset = open_dataset("demo", root, split)
    return np.stack([dataset.image(i).numpy() for i in range(len(dataset))])


def test_the_shifted_split_shows_colours_the_labelled_splits_never_show(tmp_path):
    root = tmp_path / "study"
    assert run_cli(["demo", "--preset", "study", "--out", str(root), "--train", "96", "--test", "48",
                    "--shifted", "96", "--pool", "240"]) == 0
    attributes = {split: json.loads((root / split / "attributes.json").read_text())
                  for split in ("train", "test", "shifted", "pool")}
    colours = {split: {drawn["colour"] for drawn in values.values()} for split, values in attributes.items()}
    assert colours["shifted"] == set(SHIFTED_COLOURS)
    assert not colours["shifted"] & (colours["train"] | colours["test"])
    assert colours["pool"] >= colours["shifted"] | colours["train"]

    # On the pixels: a good share of the shifted split's pixels have a shifted colour, and next to none of the
    # labelled images' (the few are noise and anti-aliased edges: about 0.1% against 7%).
    labelled = np.concatenate([split_images(root, "train"), split_images(root, "test")])
    shifted_share = pixel_share_near(split_images(root, "shifted"), SHIFTED_COLOURS)
    assert shifted_share > 0.03 and pixel_share_near(labelled, SHIFTED_COLOURS) < 0.05 * shifted_share

    # The captions carry the attributes: the pool's name shifted colours, the labelled splits' never do (as an
    # object's colour: the background's name, "on a dark green background", is left out).
    def names_a_shifted_colour(caption: str) -> bool:
        return any(f" {colour} " in f" {caption.split(' on a ')[0]} " for colour in SHIFTED_COLOURS)

    pool = open_dataset("demo", root, "pool")
    pool_captions = read_captions(root / "pool" / "captions.json", pool.keys)
    assert sum(map(names_a_shifted_colour, pool_captions)) > 30
    train = open_dataset("demo", root, "train")
    assert not any(map(names_a_shifted_colour, read_captions(root / "train" / "captions.json", train.keys)))

    # 24 classes, balanced, each in the superclass of its shape.
    assert train.class_names == sorted(STUDY_CLASS_NAMES)
    assert np.bincount(train.labels).tolist() == [4] * 24
    superclasses = json.loads((root / "superclasses.json").read_text())
    assert superclasses["striped_plus_sign"] == "plus_sign" and len(set(superclasses.values())) == 6
    assert np.array_equal(study_sample(0, "shifted", 7).image, study_sample(0, "shifted", 7).image)
    assert not np.array_equal(study_sample(0, "train", 7).image, study_sample(1, "train", 7).image)


def test_only_the_study_preset_has_a_shifted_split(tmp_path, capsys):
    demo = ["demo", "--out", str(tmp_path / "d"), "--train", "4", "--test", "4"]
    assert_user_error([*demo, "--shifted", "4"], capsys,
                      "preset shapes has no shifted split: use --preset study for one")
    assert_user_error([*demo, "--preset", "cifar"], capsys, "--preset must be one of shapes, study, got 'cifar'")
    assert_user_error([*demo, "--preset", "study", "--shifted", "-1"], capsys, "--shifted must be 0 or more, got -1")
    assert not (tmp_path / "d").exists()


def shares_by_hand(logits: np.ndarray, labels: np.ndarray, superclasses: list[int]) -> list[float]:
    """p(other classes of the label's superclass) / p(every class but the label), from the softmax, one class at a
    time."""
    shares = []
    for row, label in zip(logits.astype(np.float64), labels):
        probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        same = sum(probabilities[c] for c in range(len(row)) if c != label and superclasses[c] == superclasses[label])
        shares.append(same / (1 - probabilities[label]))
    return shares


def test_superclass_share_against_a_computation_by_hand():
    superclasses = [0, 0, 1, 1, 1]
    # Label 0, logits (2, 1, 0, 0, 0): the non-target probabilities are e, 1, 1, 1 over e + 3; superclass 0 holds e.
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0], [0.5, -1.0, 3.0, 2.5, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0],
                           [0.0, 4.0, -2.0, 1.0, 3.0]])
    labels = torch.tensor([0, 2, 4, 1])
    meter = ClassificationMeter(superclasses=superclasses)
    meter.update(logits[:2], labels[:2])
    meter.update(logits[2:], labels[2:])
    expected = shares_by_hand(logits.numpy(), labels.numpy(), superclasses)
    assert expected[0] == pytest.approx(math.e / (math.e + 3))
    assert expected[2] == pytest.approx(0.5)  # uniform: 2 of the 4 other classes share superclass 1
    assert meter.result()["superclass_share"] == pytest.approx(np.mean(expected), rel=1e-12)
    assert "superclass_share" not in ClassificationMeter().result()


def test_superclass_share_stays_exact_when_the_label_takes_all_the_probability():
    # p(label) rounds to 1 in float64: 1 - p is 0, but the non-target classes still have a distribution.
    logits = torch.tensor([[60.0, 2.0, 0.0, 0.0]])
    meter = ClassificationMeter(superclasses=[0, 0, 1, 1])
    meter.update(logits, torch.tensor([0]))
    assert meter.result()["superclass_share"] == pytest.approx(math.e ** 2 / (math.e ** 2 + 2), rel=1e-12)


def test_superclasses_file_must_name_every_class(tmp_path):
    path = tmp_path / "superclasses.json"
    path.write_text(json.dumps({"cat": "animal", "dog": "animal", "car": "vehicle"}))
    assert read_superclasses(path, ["car", "cat", "dog"]) == [1, 0, 0]
    with pytest.raises(UserError) as raised:
        read_superclasses(path, ["car", "cat", "bus"])
    assert str(raised.value) == f"superclasses file {path} names no superclass for 1 of the 3 classes (e.g. bus)"
    path.write_text('["animal"]')
    with pytest.raises(UserError, match="must map each class name to its superclass's name"):
        read_superclasses(path, ["cat"])
    with pytest.raises(UserError, match=f"cannot read superclasses file {tmp_path / 'none.json'}: No such file"):
        read_superclasses(tmp_path / "none.json", ["cat"])
    path.write_text("{")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_superclasses(path, ["cat"])


def tiny_study_params(root: Path) -> dict:
    """study/params.yaml at a size the suite can afford: every stage kept, a RichKD student and its teacher-shrink
    control, two seeds, one epoch."""
    params = yaml.safe_load((root / "study" / "params.yaml").read_text())
    params["demo"].update(train=48, test=24, shifted=24, pool=96)
    params["train_clip"].update(epochs=2, batch_size=32)
    params["train"].update(epochs=1)
    params["precompute"].update(views=2, shard_size=24, batch_size=24)
    params["distill"].update(epochs=1, seeds="0,1", jobs=2, nce_k=20, feature_start_epoch=0)
    params["label_only"]["epochs"] = 1
    kept = ("shrink_0.5", "L_clip_0.5")
    params["students"] = {name: {**params["students"][name], "epochs": 1} for name in kept}
    params["report"].update(runs=["teacher", "ce", *kept], pairs=["L_clip_0.5-vs-ce"], require_preconditions=False)
    return params


def test_a_tiny_study_runs_end_to_end(tmp_path):
    """study/dvc.yaml as shipped, with tiny params: data, CLIP, teacher, the caches, the label-only run, the
    preconditions, the students and their evaluations on both splits, and the report."""
    root = Path(__file__).parents[1]
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(root / "study" / "dvc.yaml", study / "dvc.yaml")
    (study / "params.yaml").write_text(yaml.safe_dump(tiny_study_params(root), sort_keys=False))
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in (["dvc", "init", "--no-scm", "-q"], ["dvc", "repro"]):
        finished = subprocess.run(command, cwd=study, env=environment, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stdout + finished.stderr

    summary = json.loads((study / "report" / "metrics.json").read_text())
    assert list(summary["splits"]) == ["test", "shifted"]
    assert len(summary["preconditions"]) == 8
    for split in ("test", "shifted"):
        runs, paired = summary["splits"][split]["runs"], summary["splits"][split]["paired"]
        assert list(runs) == ["teacher", "CLIP zero-shot (12 prompts)", "fused targets (alpha 0.5, clip)", "ce",
                              "shrink_0.5", "L_clip_0.5"]
        assert runs["L_clip_0.5"]["top1"]["n_seeds"] == 2 and "superclass_share" in runs["L_clip_0.5"]
        # Each against the shrink control of its alpha; ce, of no alpha, against none.
        assert list(paired) == ["L_clip_0.5-vs-shrink_0.5", "L_clip_0.5-vs-ce"]
    assert "mean_corruption_accuracy" in summary["splits"]["test"]["paired"]["L_clip_0.5-vs-shrink_0.5"]
    # The gate wrote its own report of the targets and the label-only run before any other student trained.
    gate = json.loads((study / "preconditions" / "metrics.json").read_text())
    assert gate["preconditions"] == summary["preconditions"]
    assert list(gate["splits"]["test"]["runs"])[-1] == "ce"
    for figure in ("paired_differences.png", "paired_differences_shifted.png", "robustness.png"):
        assert (study / "report" / figure).stat().st_size > 10_000
