"""The built-in demo dataset and a CLIP trained on its captions."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import TINY_CLIP
from test_bad_input import assert_user_error

from richkd.cli import run_cli
from richkd.pipeline.data import read_captions
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.demo import CLASS_NAMES, demo_sample
from richkd.pipeline.errors import UserError
from richkd.pipeline.models import create_model, read_checkpoint
from richkd.pipeline.training import optimize
from richkd.stages import train_clip
from richkd.stages.train_clip import BUNDLE_WEIGHTS


def test_demo_is_deterministic_and_varied(tmp_path):
    for out in ("a", "b"):
        assert run_cli(["demo", "--out", str(tmp_path / out), "--train", "64", "--test", "16", "--pool", "24"]) == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 64 + 16 + 24 + 6  # and each split's captions and attributes
    for path in files_a:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()

    train = open_dataset("demo", tmp_path / "a", "train")
    assert train.native_size == 16 and sorted(train.class_names) == sorted(CLASS_NAMES)
    captions = read_captions(tmp_path / "a" / "train" / "captions.json", train.keys)
    for key, caption, label in zip(train.keys, captions, train.labels):
        assert train.class_names[label].replace("_", " ") in caption and key.startswith(train.class_names[label])
    images = np.stack([train.image(i).numpy() for i in range(len(train))])
    assert images.shape == (64, 3, 16, 16) and images.std() > 30
    assert len(set(captions)) > 30 and len(set(train.labels.tolist())) == 8

    # The pool: captioned images in one folder, so that nothing in the layout gives their classes away.
    pool = open_dataset("demo", tmp_path / "a", "pool")
    assert pool.class_names == ["unlabelled"] and len(pool) == 24 and pool.native_size == 16
    pool_captions = read_captions(tmp_path / "a" / "pool" / "captions.json", pool.keys)
    assert all(any(name.replace("_", " ") in caption for name in CLASS_NAMES) for caption in pool_captions)
    assert run_cli(["demo", "--out", str(tmp_path / "big"), "--train", "2", "--test", "1", "--side", "32"]) == 0
    assert open_dataset("demo", tmp_path / "big", "train").native_size == 32


def test_the_shapes_are_drawn_as_they_were():
    """The README's demo figures were measured on these pixels and captions: a change to the drawing code (another
    preset's, say) must leave them as they are. sha256 of the first 20 samples of each split, as drawn at 749a88c."""
    digest = hashlib.sha256()
    for split in ("train", "test", "pool"):
        for index in range(20):
            sample = demo_sample(0, split, index)
            digest.update(sample.image.tobytes())
            digest.update(sample.caption.encode())
    assert digest.hexdigest() == "59feb1610b5cc134e42210f6950335a11824a01a080b15ae1a6acc72f8e0c8d9"


def test_a_different_seed_gives_different_images():
    assert not np.array_equal(demo_sample(0, "train", 5).image, demo_sample(1, "train", 5).image)
    assert not np.array_equal(demo_sample(0, "train", 5).image, demo_sample(0, "test", 5).image)


def test_missing_demo_data_says_how_to_make_it(tmp_path, capsys):
    assert run_cli(["train", "--dataset", "demo", "--data-root", str(tmp_path / "nowhere"),
                    "--out", str(tmp_path / "run")]) == 2
    assert "generate it with `richkd demo --out" in capsys.readouterr().err
    assert run_cli(["demo", "--out", str(tmp_path / "demo"), "--train", "8", "--test", "4"]) == 0
    capsys.readouterr()
    assert run_cli(["train", "--dataset", "demo", "--data-root", str(tmp_path / "demo"), "--split", "validation",
                    "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: the demo under {tmp_path / 'demo'} has no split 'validation'; "
                                               "splits: test, train")


def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path, capsys):
    assert run_cli(["demo", "--out", str(tmp_path / "demo"), "--seed", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --seed must be 0 or more, got -1"
    assert not (tmp_path / "demo").exists()


def test_a_demo_over_another_is_replaced_only_when_asked(tmp_path, capsys):
    """New images beside an older demo's of other sizes would mix the two, its captions listing only the new."""
    out = tmp_path / "demo"
    assert run_cli(["demo", "--out", str(out), "--train", "8", "--test", "4", "--side", "32"]) == 0
    assert f"shapes demo written to {out}: 8 train, 4 test images" in capsys.readouterr().err
    again = ["demo", "--out", str(out), "--train", "6", "--test", "3"]
    assert_user_error(again, capsys, f"--out {out} is not empty: pass --overwrite to replace the demo there")
    assert run_cli([*again, "--overwrite"]) == 0
    capsys.readouterr()
    train = open_dataset("demo", out, "train")
    assert len(train) == 6 and train.native_size == 16
    assert len(read_captions(out / "train" / "captions.json", train.keys)) == 6
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    assert_user_error(["demo", "--out", str(mine), "--overwrite"], capsys,
                      f"--out {mine} holds files that are not a richkd demo: not replacing them")
    assert (mine / "thesis.tex").read_text() == "mine"


def test_captions_file_must_cover_every_sample(tmp_path, capsys):
    assert run_cli(["demo", "--out", str(tmp_path), "--train", "8", "--test", "4"]) == 0
    captions = json.loads((tmp_path / "train" / "captions.json").read_text())
    captions.pop(next(iter(captions)))
    (tmp_path / "partial.json").write_text(json.dumps(captions))
    train = open_dataset("demo", tmp_path, "train")
    with pytest.raises(UserError, match="has no caption for 1 samples"):
        read_captions(tmp_path / "partial.json", train.keys)
    with pytest.raises(UserError) as raised:
        read_captions(tmp_path / "missing.json", train.keys)
    assert str(raised.value) == f"cannot read captions file {tmp_path / 'missing.json'}: No such file or directory"
    (tmp_path / "broken.json").write_text('{"a": ')
    with pytest.raises(UserError, match="is not valid JSON"):
        read_captions(tmp_path / "broken.json", train.keys)
    (tmp_path / "list.json").write_text('["a kite"]')
    with pytest.raises(UserError, match="must map each sample key to its caption, found list"):
        read_captions(tmp_path / "list.json", train.keys)
    numbered = json.loads((tmp_path / "train" / "captions.json").read_text())
    numbered[train.keys[3]] = 7
    (tmp_path / "numbered.json").write_text(json.dumps(numbered))
    capsys.readouterr()
    assert run_cli(["train-clip", "--data-root", str(tmp_path), "--split", "train", "--captions",
                    str(tmp_path / "numbered.json"), "--out", str(tmp_path / "clip"), "--device", "cpu"]) == 2
    assert f"captions file {tmp_path / 'numbered.json'}: 1 captions are not text (e.g. {train.keys[3]}: 7)" in \
        " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "clip").exists()


def test_train_clip_writes_a_bundle_that_precompute_loads(tmp_path):
    """On images larger than CLIP's input (32 px for a 16 px model), train-clip must show CLIP each whole image
    resized, as precompute does, not a patch of it."""
    from richkd.pipeline.clip import load_clip

    assert run_cli(["demo", "--out", str(tmp_path / "demo"), "--train", "96", "--test", "32", "--side", "32"]) == 0
    bundle = tmp_path / "clip"
    assert run_cli(["train-clip", "--data-root", str(tmp_path / "demo"), "--epochs", "2", "--batch-size", "32",
                    "--num-workers", "0", "--device", "cpu", "--out", str(bundle)]) == 0
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["history"][1]["loss"] < metrics["history"][0]["loss"]
    clip = load_clip(f"local-dir:{bundle}", None)
    assert clip.image_size == (16, 16) and len(clip.checkpoint_sha256) == 64

    teacher = tmp_path / "teacher"
    assert run_cli(["train", "--dataset", "demo", "--data-root", str(tmp_path / "demo"), "--arch", "resnet8",
                    "--epochs", "1", "--num-workers", "0", "--device", "cpu", "--out", str(teacher)]) == 0
    assert run_cli(["precompute", "--dataset", "demo", "--data-root", str(tmp_path / "demo"), "--teacher", "resnet8",
                    "--teacher-checkpoint", str(teacher / "checkpoints" / "last.pt"), "--clip", f"local-dir:{bundle}",
                    "--views", "1", "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "c.zarr")]) == 0
    # train-clip's zero-shot accuracy, against the stored CLIP logits of the test split's centre views.
    assert run_cli(["precompute", "--dataset", "demo", "--data-root", str(tmp_path / "demo"), "--split", "test",
                    "--view-policy", "center", "--dtype", "float32", "--teacher", "resnet8",
                    "--teacher-checkpoint", str(teacher / "checkpoints" / "last.pt"), "--clip", f"local-dir:{bundle}",
                    "--views", "1", "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "test.zarr")]) == 0
    test_store = zarr.open_group(tmp_path / "test.zarr", mode="r")
    stored = (test_store["clip/logits"][0].argmax(axis=1) == test_store["labels"][:]).mean()
    assert metrics["zero_shot_top1"] == pytest.approx(stored, abs=1e-12)


def train_clip_args(demo: Path, out: Path, *flags: str) -> list[str]:
    """A train-clip run of a few seconds on a small demo."""
    return ["train-clip", "--data-root", str(demo), "--batch-size", "16", "--num-workers", "0", "--device", "cpu",
            "--out", str(out), *flags]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    demo = tmp_path_factory.mktemp("clip") / "demo"
    assert run_cli(["demo", "--out", str(demo), "--train", "64", "--test", "16"]) == 0
    return demo


def test_train_clip_replaces_a_bundle_only_when_asked(small_demo, tmp_path, capsys):
    bundle = tmp_path / "clip"
    one_epoch = train_clip_args(small_demo, bundle, "--epochs", "1", "--warmup-epochs", "0")
    assert run_cli(one_epoch) == 0
    weights = (bundle / BUNDLE_WEIGHTS).read_bytes()
    capsys.readouterr()
    assert_user_error(one_epoch, capsys, f"{bundle} already holds a CLIP bundle: pass --resume to continue it or "
                                         "--overwrite")
    assert (bundle / BUNDLE_WEIGHTS).read_bytes() == weights
    assert run_cli([*one_epoch, "--overwrite", "--seed", "1"]) == 0
    assert (bundle / BUNDLE_WEIGHTS).read_bytes() != weights
    assert json.loads((bundle / "metrics.json").read_text())["config"]["seed"] == 1
    assert sorted(path.name for path in bundle.iterdir()) == [
        "checkpoints", "metrics.json", "open_clip_config.json", BUNDLE_WEIGHTS]
    # A bundle without its run's checkpoints (one written before train-clip kept them) is only ever replaced.
    shutil.rmtree(bundle / "checkpoints")
    capsys.readouterr()
    for flags in ((), ("--resume",)):
        assert_user_error([*one_epoch, *flags], capsys, f"{bundle} already holds a CLIP bundle, without the checkpoint "
                                                        "to continue its run: pass --overwrite to replace it")
    # A folder holding anything else is never replaced.
    (bundle / "notes.txt").write_text("mine")
    assert_user_error([*one_epoch, "--overwrite"], capsys,
                      f"--out {bundle} holds files that are not a train-clip bundle or run (notes.txt): not replacing "
                      "them")
    assert (bundle / "notes.txt").read_text() == "mine" and (bundle / BUNDLE_WEIGHTS).exists()


def test_interrupted_train_clip_resumes_bit_identical(small_demo, tmp_path, capsys, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_cli(train_clip_args(small_demo, straight, "--epochs", "3")) == 0
    args = train_clip_args(small_demo, interrupted, "--epochs", "3")

    def ctrl_c_in_epoch_2(loader, losses, optimizer, progress, task, epoch, kept, after_step):
        def step_then_ctrl_c() -> None:  # one step into the second epoch: the weights have moved past the checkpoint
            after_step()
            if epoch == 1:
                raise KeyboardInterrupt

        return optimize(loader, losses, optimizer, progress, task, epoch, kept, step_then_ctrl_c)

    with monkeypatch.context() as patch:
        patch.setattr(train_clip, "optimize", ctrl_c_in_epoch_2)
        capsys.readouterr()
        assert run_cli(args) == 130
    last_line = " ".join(capsys.readouterr().err.strip().splitlines()[-1].split())
    assert last_line == (f"interrupted: the checkpoint of the last finished epoch in {interrupted} is kept; "
                         f"continue with: {shlex.join(['richkd', *args])} --resume")
    assert read_checkpoint(interrupted / "checkpoints" / "last.pt")[1]["epoch"] == 1
    assert not (interrupted / BUNDLE_WEIGHTS).exists()
    assert_user_error(args, capsys, f"{interrupted} already holds a run: pass --resume to continue it or --overwrite")

    assert run_cli([*args, "--resume"]) == 0
    assert (interrupted / BUNDLE_WEIGHTS).read_bytes() == (straight / BUNDLE_WEIGHTS).read_bytes()
    assert (interrupted / "open_clip_config.json").read_bytes() == (straight / "open_clip_config.json").read_bytes()
    history = json.loads((straight / "metrics.json").read_text())["history"]
    assert json.loads((interrupted / "metrics.json").read_text())["history"] == history
    # Resumed once finished: nothing to train, and the bundle stands.
    written = {path: path.stat().st_mtime_ns for path in interrupted.rglob("*")}
    capsys.readouterr()
    assert run_cli([*args, "--resume"]) == 0
    assert f"trained already (3 epochs), the bundle {interrupted} stands" in " ".join(capsys.readouterr().err.split())
    assert {path: path.stat().st_mtime_ns for path in interrupted.rglob("*")} == written


def test_train_clip_resumes_only_with_its_settings(small_demo, tmp_path, capsys):
    bundle = tmp_path / "clip"
    args = train_clip_args(small_demo, bundle, "--warmup-epochs", "0")
    assert run_cli([*args, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert_user_error([*args, "--epochs", "1", "--resume", "--lr", "0.01"], capsys,
                      f"cannot resume {bundle}: it was run with lr=0.001, now 0.01")
    # Its length may change: the finished run goes on for the epochs added.
    assert run_cli([*args, "--epochs", "2", "--resume"]) == 0
    assert [entry["epoch"] for entry in json.loads((bundle / "metrics.json").read_text())["history"]] == [1, 2]
    assert read_checkpoint(bundle / "checkpoints" / "last.pt")[1]["epoch"] == 2


def test_the_unlabelled_pool_is_refused_where_classes_are_learnt_or_scored(tiny_world, tmp_path, capsys):
    """The pool's one folder stands for no class: trained on, it made a one-class model that failed on the test
    split after an epoch; evaluated on, every image would score as that class."""
    demo = tmp_path / "demo"
    assert run_cli(["demo", "--out", str(demo), "--train", "8", "--test", "8", "--pool", "8"]) == 0
    teacher = tmp_path / "teacher.pth"
    torch.save(create_model("resnet8", len(CLASS_NAMES)).state_dict(), teacher)
    data = ["--dataset", "demo", "--data-root", str(demo), "--num-workers", "0", "--device", "cpu"]
    store = tmp_path / "c.zarr"
    precompute = ["precompute", *data, "--teacher", "resnet8", "--teacher-checkpoint", str(teacher),
                  "--clip", TINY_CLIP, "--clip-pretrained", str(tiny_world.clip_checkpoint), "--views", "1"]
    assert run_cli([*precompute, "--out", str(store)]) == 0
    capsys.readouterr()
    one_epoch = ["--arch", "resnet8", "--epochs", "1", "--batch-size", "8"]  # short, were the pool not refused
    train = ["train", *data, *one_epoch, "--out", str(tmp_path / "run")]
    distill = ["distill", *data, *one_epoch, "--cache", str(store), "--out", str(tmp_path / "student")]
    for flag, command in [("--split", train), ("--eval-split", train), ("--split", distill), ("--eval-split", distill),
                          ("--split", [*precompute, "--out", str(tmp_path / "pool.zarr")]),
                          ("--split", ["evaluate", *data, "--checkpoint", str(teacher), "--arch", "resnet8"]),
                          ("--eval-split", ["train-clip", *data, "--out", str(tmp_path / "clip")])]:
        assert_user_error([*command, flag, "pool"], capsys, f"{flag} pool: the demo's pool split is unlabelled "
                          "images with captions, for train-clip --split: it has no classes to learn or score")
    assert not (tmp_path / "run").exists() and not (tmp_path / "pool.zarr").exists()
