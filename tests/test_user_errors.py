"""Every user error richkd recognises: each in the table of docs/errors.md, each with a test that triggers it.

The errors the other test files trigger are linked from the table; this file triggers the rest.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import write_cifar100
from PIL import Image
from test_bad_input import assert_user_error, replace_flag

from richkd.cli import run_cli
from richkd.pipeline.data import write_cifar
from richkd.pipeline.models import create_model, read_checkpoint

PROJECT = Path(__file__).parents[1]
CODE_SPAN = re.compile(r"(`+) ?(.+?) ?\1")
PLACEHOLDER = re.compile(r"<[^<>]*>")


def source_messages() -> list[tuple[str, list[str]]]:
    """(where, literal pieces) of every message given to UserError(...) or require(..., message)."""
    messages = []
    folders = ("richkd", "pipeline", "stages", "cache")
    for path in sorted(path for folder in folders for path in (PROJECT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name == "UserError" and node.args:
                message = node.args[0]
            elif name == "require" and len(node.args) == 2:
                message = node.args[1]
            else:
                continue
            if isinstance(message, ast.Constant):
                pieces = [message.value]
            elif isinstance(message, ast.JoinedStr):
                pieces = [part.value for part in message.values if isinstance(part, ast.Constant)]
            else:  # require()'s own pass-through
                continue
            messages.append((f"{path.relative_to(PROJECT)}:{node.lineno}", pieces))
    return messages


def error_table() -> list[tuple[list[str], list[str]]]:
    """(messages, tests) of each row of the table of user errors in docs/errors.md."""
    rows = []
    for line in (PROJECT / "docs" / "errors.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) == 3 and "::" in cells[2]:
            messages = [match[2] for match in CODE_SPAN.finditer(cells[1])]
            tests = [match[2] for match in CODE_SPAN.finditer(cells[2])]
            rows.append((messages, tests))
    return rows


def test_every_user_error_is_in_the_table():
    documented = "\n".join(message for messages, _ in error_table() for message in messages)
    missing = [f"{where}: {max(pieces, key=len).strip()!r}" for where, pieces in source_messages()
               if max(pieces, key=len).strip() not in documented]
    assert not missing, "user errors missing from the table of docs/errors.md:\n" + "\n".join(missing)


def string_literals(source: str) -> set[str]:
    """The text pieces of every string literal in `source`, f-strings included."""
    pieces = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            pieces.add(node.value)
        elif isinstance(node, ast.JoinedStr):
            pieces.update(part.value for part in node.values if isinstance(part, ast.Constant))
    return {piece.strip() for piece in pieces}


def test_every_row_names_tests_that_trigger_its_messages():
    rows = error_table()
    assert len(rows) >= 40
    problems = []
    for messages, tests in rows:
        assert messages and tests, (messages, tests)
        literals = set()
        for test in tests:
            file, name = test.split("::")
            source = (PROJECT / "tests" / file).read_text()
            if not re.search(rf"^def {name}\(", source, re.MULTILINE):
                problems.append(f"{test} does not exist")
            literals |= {literal for literal in string_literals(source) if len(literal) >= 10}
        for message in messages:  # a test asserts a piece of the message
            fragments = PLACEHOLDER.split(message)
            if not any(literal in fragment for literal in literals for fragment in fragments):
                problems.append(f"none of {tests} checks {message!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["train", "--eval-batch-size", "0"], "--eval-batch-size must be at least 1, got 0"),
    (["train", "--lr", "0"], "--lr must be positive, got 0.0"),
    (["train", "--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["train", "--weight-decay", "-1"], "--weight-decay must be 0 or more, got -1.0"),
    (["train", "--optimizer", "adam"], "--optimizer must be one of sgd, adamw, got 'adam'"),
    (["train", "--schedule", "step"], "--schedule must be one of multistep, cosine, got 'step'"),
    (["train", "--lr-decay", "0"], "--lr-decay must be in (0, 1], got 0.0"),
    (["train", "--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs must be in [0, epochs), got 2"),
    (["train", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["train-clip", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["train", "--milestones", "150,x"], "--milestones must be comma-separated fractions of --epochs or epochs, "
                                         "got '150,x'"),
    (["train", "--milestones", "180,150"], "--milestones must be increasing and positive, got '180,150'"),
    (["train", "--milestones", "0.5,1.5"], "--milestones fractions must lie in (0, 1), got '0.5,1.5'"),
    (["train", "--num-workers", "-1"], "--num-workers must be 0 or more, got -1"),
    (["train", "--image-size", "0"], "--image-size must be positive, got 0"),
    (["distill", "--logit-loss", "mse"], "--logit-loss must be kd or dkd, got 'mse'"),
    (["distill", "--lam", "1.5"], "--lam must be in [0, 1], got 1.5"),
    (["distill", "--feature-weight", "-1"], "--feature-weight must be 0 or more, got -1.0"),
    (["distill", "--dkd-warmup", "-1"], "--dkd-warmup must be 0 or more, got -1"),
    (["distill", "--nce-k", "0"], "--nce-k must be at least 1, got 0"),
    (["distill", "--nce-temperature", "0"], "--nce-temperature must be positive, got 0.0"),
    (["distill", "--nce-momentum", "1"], "--nce-momentum must be in [0, 1), got 1.0"),
    (["distill", "--embed-dim", "0"], "--embed-dim must be at least 1, got 0"),
    (["distill", "--shuffle-buffer", "0"], "--shuffle-buffer must be at least 1, got 0"),
    (["distill", "--clip-scale", "-2"], "--clip-scale must be positive, got -2"),
    (["precompute", "--teacher-checkpoint", "t.pth", "--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    (["precompute"], "--teacher-checkpoint is required"),
    (["evaluate"], "--checkpoint is required"),
    (["evaluate", "--checkpoint", "c.pt", "--confidence-threshold", "0"],
     "--confidence-threshold must be in (0, 1], got 0.0"),
    (["evaluate", "--checkpoint", "c.pt", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["demo", "--train", "0"], "--train and --test must be at least 1"),
    (["demo", "--pool", "-1"], "--pool must be 0 or more, got -1"),
    (["demo", "--side", "4"], "--side must be at least 8 pixels, got 4"),
    (["train", "--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1.0"),
    (["train", "--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["train", "--seed", "5", "--seeds", "0,1"],
     "--seed 5 and --seeds 0,1 exclude each other: --seeds trains one run per seed"),
    (["evaluate", "--checkpoint", "c.pt", "--image-size", "0"], "--image-size must be positive, got 0"),
    (["precompute", "--teacher-checkpoint", "t.pth", "--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["train-clip", "--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["train-clip", "--weight-decay", "-1"], "--weight-decay must be 0 or more, got -1.0"),
    (["train", "--seeds", "0,x"], "--seeds must be comma-separated seeds such as 0,1,2, got '0,x'"),
    (["train", "--seeds", "1,1"], "--seeds must be distinct seeds of 0 or more, got '1,1'"),
    (["train", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["distill", "--feature-start-epoch", "-1"], "--feature-start-epoch must be 0 or more, got -1"),
    (["distill", "--feature-warmup-epochs", "-1"], "--feature-warmup-epochs must be 0 or more, got -1"),
    (["distill", "--dataset", "webdataset", "--stream"],
     "--stream reads every training sample in turn, none can be held out: pass --val-fraction 0"),
    (["train-clip", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["train-clip", "--batch-size", "1"], "--batch-size must be at least 2 (a contrastive batch), got 1"),
    (["train-clip", "--lr", "0"], "--lr must be positive, got 0.0"),
    (["train-clip", "--epochs", "1", "--warmup-epochs", "1"], "--warmup-epochs must be in [0, epochs), got 1"),
    (["report", "--alpha", "2"], "--alpha must be in [0, 1], got 2.0"),
    (["distill", "--fuse", "teacher:0.5"],
     "--fuse must be SOURCE=WEIGHT pairs separated by commas, such as teacher=0.5,clip=0.5; got 'teacher:0.5'"),
    (["distill", "--fuse", "clip=0.5,clip=0.2"], "--fuse weighs source clip twice: give each source once"),
    (["distill", "--fuse", "teacher=1,clip=-1"], "--fuse weights must be finite numbers of 0 or more, got clip=-1.0"),
    (["report", "--fuse", "teacher=0,clip=0"], "--fuse needs a source with a weight above 0, got teacher 0, clip 0"),
    (["distill", "--fuse", "teacher=1", "--lam", "0.5"], "--lam weighs the teacher's features against CLIP's; with "
     "--fuse, CRD fuses the sources' features at the --fuse weights: leave --lam out"),
])
def test_option_checks(argv, message, capsys):
    assert_user_error(argv, capsys, message)


def test_jobs_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_user_error(["train", "--seeds", "0,1", "--batch-size", "32", "--jobs", "2"], capsys,
                      "--jobs runs seeds in processes of its own: under torchrun, leave it at 1")


def image_folder(root: Path, classes: tuple[str, ...], sizes: tuple[int, ...] = (36, 40, 44)) -> None:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / "train" / name).mkdir(parents=True)
        for i, side in enumerate(sizes):
            image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "train" / name / f"{i}.png")


def test_dataset_errors(tiny_world, tmp_path, capsys):
    precompute = tiny_world.precompute_args(tmp_path / "c.zarr")

    def with_data(dataset: str, root: Path, *extra: str) -> list[str]:
        return [*replace_flag(replace_flag(precompute, "--dataset", dataset), "--data-root", str(root)), *extra]

    empty = tmp_path / "empty_cifar"
    write_cifar(empty, "cifar100", {split: (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, int))
                                    for split in ("train", "test")}, tiny_world.class_names)
    assert_user_error(with_data("cifar100", empty), capsys, f"dataset 'cifar100' split 'train' under {empty} "
                      "has no samples")
    broken = tmp_path / "broken_cifar"
    write_cifar100(broken, train=8, test=4)
    (broken / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    assert_user_error(with_data("cifar100", broken), capsys, f"cannot read cifar100 data under {broken}")
    # Labels past the classes, in the training file and the test file, are refused naming the file and the sample.
    images = np.zeros((6, 32, 32, 3), np.uint8)
    labelled = tmp_path / "bad_labels"
    write_cifar(labelled, "cifar100", {"train": (images, np.array([0, 1, 2, 3, 4, 100])),
                                       "test": (images, np.array([0, -1, 2, 3, 4, 5]))}, tiny_world.class_names)
    assert_user_error(with_data("cifar100", labelled), capsys, f"{labelled / 'cifar-100-python' / 'train'}: sample 5 "
                      "has label 100, not a class id of the 100 cifar100 classes (0 to 99)")
    assert_user_error(with_data("cifar100", labelled, "--split", "test"), capsys,
                      f"{labelled / 'cifar-100-python' / 'test'}: sample 1 has label -1, not a class id")

    folder = tmp_path / "images"
    image_folder(folder, ("cat", "dog"))
    assert_user_error(with_data("imagefolder", folder, "--download"), capsys,
                      "dataset 'imagefolder' cannot be downloaded; point --data-root at the folder")
    assert_user_error(with_data("imagefolder", folder, "--split", "val"), capsys,
                      f"no split folder {folder / 'val'} (an image folder dataset is <root>/<split>/<class>/<image>)")
    (folder / "test").mkdir()
    (folder / "test" / "stray.png").write_bytes(b"")
    assert_user_error(with_data("imagefolder", folder, "--split", "test"), capsys,
                      f"no class folders under {folder / 'test'}")
    assert_user_error(with_data("imagefolder", folder, "--view-policy", "pad_crop"), capsys,
                      "view policy pad_crop needs --image-size for a dataset whose images may differ in size")


def test_checkpoint_that_weights_only_loading_refuses(tiny_world, tmp_path, capsys):
    checkpoint = tmp_path / "pickled.pth"
    torch.save({"model": create_model("resnet8", 100).state_dict(), "args": argparse.Namespace(lr=0.05)}, checkpoint)
    args = ["evaluate", "--data-root", str(tiny_world.data_root), "--checkpoint", str(checkpoint), "--arch", "resnet8"]
    assert_user_error(args, capsys, f"checkpoint {checkpoint}: holds a argparse.Namespace object, "
                      "which weights-only loading refuses")


def test_precompute_refuses_a_teacher_trained_on_other_classes(tiny_world, tmp_path, capsys):
    """A renamed class folder shifts the class ids: the teacher's recorded class names must match the split's."""
    state, _ = read_checkpoint(tiny_world.teacher_checkpoint)
    trained = list(tiny_world.class_names)
    trained[3], trained[4] = trained[4], trained[3]
    checkpoint = tmp_path / "other_classes.pth"
    torch.save({"model": state, "class_names": trained}, checkpoint)
    store = tmp_path / "store.zarr"
    args = replace_flag(tiny_world.precompute_args(store), "--teacher-checkpoint", str(checkpoint))
    assert_user_error(args, capsys, f"teacher checkpoint {checkpoint} was trained on other classes than cifar100 / "
                      f"train (class 3 is '{trained[3]}' there and '{tiny_world.class_names[3]}' here): its logits "
                      "would be stored under the wrong classes")
    assert not store.exists()
    torch.save({"model": state, "class_names": list(tiny_world.class_names)}, checkpoint)
    assert run_cli(args) == 0


def test_devices(tiny_world, capsys):
    args = ["evaluate", "--data-root", str(tiny_world.data_root), "--checkpoint", "c.pt"]
    assert_user_error([*args, "--device", "mps"], capsys, "unsupported device 'mps'; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        assert_user_error([*args, "--device", "cuda"], capsys,
                          "device 'cuda' requested but CUDA is not available here; use --device cpu or auto")


def test_templates_file_without_templates(tiny_world, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("# only a comment\n\n")
    assert_user_error(tiny_world.precompute_args(tmp_path / "c.zarr", "--templates", str(templates)), capsys,
                      f"templates file {templates} has no templates")


def test_report_errors(tmp_path, capsys):
    evals = tmp_path / "evals"
    evals.mkdir()
    assert_user_error(["report", "--evals", str(evals)], capsys,
                      f"no evaluations in {evals}: run `richkd evaluate --output {evals}/NAME.json` first")
    assert_user_error(["report", "--evals", str(evals), "--runs", "kd"], capsys,
                      f"cannot read evaluation {evals / 'kd.json'}: No such file or directory")
    (evals / "kd.json").write_text('{"top1": 0.8,')
    assert_user_error(["report", "--evals", str(evals)], capsys, f"evaluation {evals / 'kd.json'} is not valid JSON")
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    assert_user_error(["report", "--evals", str(shifted), "--evals", str(tmp_path / "nowhere"), "--runs", "kd"],
                      capsys, f"no evaluation of kd in {shifted}, {tmp_path / 'nowhere'}")
    assert_user_error(["report", "--evals", str(evals), "--require-preconditions"], capsys,
                      "--require-preconditions and --preconditions-only need --shifted-split and --label-only")


def test_distilling_one_class_with_crd(tiny_world, tmp_path, capsys):
    folder = tmp_path / "images"
    image_folder(folder, ("cat",))
    teacher = tmp_path / "teacher.pth"
    torch.save(create_model("resnet8", 1).state_dict(), teacher)
    data = ["--dataset", "imagefolder", "--data-root", str(folder), "--num-workers", "0", "--device", "cpu"]
    precompute = tiny_world.precompute_args(tmp_path / "c.zarr", "--views", "1", "--image-size", "32", *data)
    assert run_cli(replace_flag(precompute, "--teacher-checkpoint", str(teacher))) == 0
    capsys.readouterr()
    assert_user_error(["distill", *data, "--cache", str(tmp_path / "c.zarr"), "--eval-split", "train",
                       "--arch", "resnet8", "--variant", "F", "--out", str(tmp_path / "run")], capsys,
                      "CRD needs at least two classes to draw negatives from")


def test_diverging_training_stops(tiny_world, tmp_path, capsys):
    assert run_cli(["train", "--data-root", str(tiny_world.data_root), "--arch", "resnet8", "--lr", "1e30",
                    "--batch-size", "4", "--epochs", "1", "--num-workers", "0", "--device", "cpu",
                    "--out", str(tmp_path / "run")]) == 2
    # Training had begun (its views and normalisation announced) when the loss stopped being a number.
    views, normalization, error = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert views.startswith("views: pad-crop to 32 px") and normalization.startswith("normalization: cifar100's")
    # The first step with that learning rate sends the weights to infinity; the second batch's loss is nan.
    assert error.startswith("error: training diverged in epoch 1 at batch 2 (samples ")
    assert error.endswith("the loss is nan; no epoch had ended, so there is no checkpoint; lower --lr or check the "
                          "loss weights")


def test_diverging_clip_training_stops_before_writing_a_bundle(tmp_path, capsys):
    assert run_cli(["demo", "--out", str(tmp_path / "demo"), "--train", "64", "--test", "16"]) == 0
    capsys.readouterr()
    assert_user_error(["train-clip", "--data-root", str(tmp_path / "demo"), "--lr", "1e30", "--epochs", "2",
                       "--batch-size", "16", "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "clip")],
                      capsys, "training diverged in epoch 1 at batch ",
                      "no epoch had ended, so there is no checkpoint", "; lower --lr")
    assert not (tmp_path / "clip").exists()


def test_constant_images_have_no_std_to_normalise_by(tmp_path, capsys):
    grey = np.full((8, 32, 32, 3), 128, dtype=np.uint8)
    write_cifar(tmp_path, "cifar10", {"train": (grey, np.arange(8) % 2), "test": (grey, np.arange(8) % 2)},
                ["cat", "dog"])
    assert_user_error(["train", "--dataset", "cifar10", "--data-root", str(tmp_path), "--normalize", "dataset",
                       "--out", str(tmp_path / "run")], capsys,
                      "--normalize dataset: a channel of the 8 images measured in train is constant, so it has no "
                      "std to divide by")


def test_divergence_keeps_the_last_good_checkpoint(tiny_world, tmp_path, capsys):
    train = ["train", "--data-root", str(tiny_world.data_root), "--arch", "resnet8", "--batch-size", "8",
             "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert run_cli([*train, "--epochs", "1"]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=False)
    payload["model"]["fc.bias"][0] = float("inf")  # a model whose next loss is not a number
    del payload["crc32c"]  # an edited checkpoint, saved without richkd's checksum as another tool would
    torch.save(payload, last)
    kept = last.read_bytes()
    capsys.readouterr()
    assert_user_error([*train, "--epochs", "2", "--resume"], capsys,
                      "training diverged in epoch 2 at batch 1 (samples ",
                      f"the loss is nan; {last} (epoch 1) is kept; lower --lr")
    assert last.read_bytes() == kept


def test_stores_that_cannot_be_read(tiny_world, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    assert_user_error(["inspect", str(a_file)], capsys, f"{a_file} exists but is not a richkd cache store")
    zarr.create_group(tmp_path / "plain.zarr")
    assert_user_error(["inspect", str(tmp_path / "plain.zarr")], capsys,
                      f"{tmp_path / 'plain.zarr'} is not a richkd cache store (no 'richkd-cache' format attribute)")

    store = tmp_path / "cache.zarr"
    assert run_cli(tiny_world.precompute_args(store)) == 0
    capsys.readouterr()
    group = zarr.open_group(store, mode="r+")
    version = group.attrs["schema_version"]
    group.attrs["schema_version"] = version + 1
    assert_user_error(["inspect", str(store)], capsys,
                      f"cache {store} has schema version {version + 1}; this richkd reads versions 1 and 2")
    group.attrs["schema_version"] = version
    del group["clip/logits"]
    assert_user_error(["inspect", str(store)], capsys, f"cache {store} has no array 'clip/logits'")
