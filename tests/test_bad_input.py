"""Every user error of `richkd precompute`: exit status 2, one line naming the problem, no complete store."""

from __future__ import annotations

import os
import shlex
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from richkd.cli import run_cli
from richkd.pipeline.config import build_config
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.models import create_model
from richkd.pipeline.shards import decode_image
from richkd.stages.train import TrainConfig

RICHKD = str(Path(sys.executable).parent / "richkd")


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag` set to `value`, replacing its value when present."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
        return args
    return [*args, flag, value]


def assert_user_error(args: list[str], capsys, *fragments: str) -> str:
    """One error line, after at most the lines announcing the views and normalisation of work that had begun."""
    assert run_cli(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    while lines and lines[0].startswith(("views: ", "normalization: ")):
        lines.pop(0)
    err = "\n".join(lines)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err, err
    return err


def assert_no_complete_store(out) -> None:
    if out.exists():
        assert not zarr.open_group(out, mode="r")["progress/done"][...].all()


def image_folder(root, broken: str | None = None):
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(3):
            size = (40 + 4 * i, 36 + label)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if broken:
        (root / "train" / "dog" / broken).write_bytes(b"\x89PNG\r\n\x1a\n not really")


def decompression_bomb_png(side: int = 20000) -> bytes:
    """A PNG of a few bytes whose header says it is side x side pixels, beyond PIL's decompression-bomb limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("flag, value, fragments", [
    ("--data-root", "/nowhere", ("no cifar100 data under /nowhere", "--download")),
    ("--dataset", "mnist", ("unknown dataset 'mnist'", "cifar100")),
    ("--teacher", "resnet9000", ("unknown model 'resnet9000'",)),
    ("--teacher-checkpoint", "/nowhere/teacher.pth", ("teacher checkpoint /nowhere/teacher.pth does not exist",)),
    ("--clip", "ViT-Nope", ("unknown CLIP model 'ViT-Nope'",)),
    ("--clip-pretrained", "laion9b", ("'laion9b' is not a pretrained tag of",)),
    ("--clip-pretrained", "/nowhere/clip.pt", ("CLIP checkpoint /nowhere/clip.pt does not exist",)),
    ("--views", "0", ("--views must be at least 1, got 0",)),
    ("--batch-size", "0", ("--batch-size must be at least 1",)),
    ("--dtype", "int8", ("--dtype must be one of float16, float32",)),
    ("--split", "validation", ("has no split 'validation'",)),
    ("--device", "tpu", ("unknown device 'tpu'",)),
    ("--view-policy", "diagonal", ("unknown view policy 'diagonal'",)),
    ("--templates", "/nowhere/templates.txt", ("cannot read templates file /nowhere/templates.txt",)),
])
def test_bad_flags(tiny_world, tmp_path, capsys, flag, value, fragments):
    out = tmp_path / "cache.zarr"
    assert_user_error(replace_flag(tiny_world.precompute_args(out), flag, value), capsys, *fragments)
    assert_no_complete_store(out)


def test_checkpoint_of_another_architecture(tiny_world, tmp_path, capsys):
    checkpoint = tmp_path / "resnet14.pth"
    torch.save({"model": create_model("resnet14", 100).state_dict()}, checkpoint)
    out = tmp_path / "cache.zarr"
    assert_user_error(replace_flag(tiny_world.precompute_args(out), "--teacher-checkpoint", str(checkpoint)),
                      capsys, str(checkpoint), "unexpected")
    assert_no_complete_store(out)


def test_truncated_checkpoint(tiny_world, tmp_path, capsys):
    checkpoint = tmp_path / "truncated.pth"
    whole = tiny_world.teacher_checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "cache.zarr"
    assert_user_error(replace_flag(tiny_world.precompute_args(out), "--teacher-checkpoint", str(checkpoint)),
                      capsys, f"checkpoint {checkpoint}: not a torch checkpoint, or a damaged or truncated one")


def test_checkpoint_with_another_class_count(tiny_world, tmp_path, capsys):
    checkpoint = tmp_path / "resnet8_cifar10.pth"
    torch.save({"model": create_model("resnet8", 10).state_dict()}, checkpoint)
    out = tmp_path / "cache.zarr"
    assert_user_error(replace_flag(tiny_world.precompute_args(out), "--teacher-checkpoint", str(checkpoint)),
                      capsys, str(checkpoint), "10 classes", "100")


def test_class_names_file_of_the_wrong_length(tiny_world, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("apple\npear\n")
    out = tmp_path / "cache.zarr"
    assert_user_error(tiny_world.precompute_args(out, "--class-names", str(names)), capsys,
                      f"class names file {names} has 2 names, the dataset has 100 classes")


def test_template_without_a_slot(tiny_world, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}\na photo\n")
    assert_user_error(tiny_world.precompute_args(tmp_path / "c.zarr", "--templates", str(templates)), capsys,
                      "template 2 'a photo' must contain '{}' exactly once")
    for template in ("a {} of {x}", "a {} of {"):
        templates.write_text(f"a photo of a {{}}\n{template}\n")
        assert_user_error(tiny_world.precompute_args(tmp_path / "c.zarr", "--templates", str(templates)), capsys,
                          f"template 2 '{template}' has braces besides its '{{}}'; "
                          "write a literal brace as {{ or }}")
        assert not (tmp_path / "c.zarr").exists()


def test_empty_image_folder(tiny_world, tmp_path, capsys):
    (tmp_path / "images" / "train" / "cat").mkdir(parents=True)
    args = tiny_world.precompute_args(tmp_path / "c.zarr")
    args = replace_flag(replace_flag(args, "--dataset", "imagefolder"), "--data-root", str(tmp_path / "images"))
    assert_user_error(args, capsys, "no images under")


def test_an_image_beyond_the_decompression_bomb_limit_is_named(tmp_path, capsys):
    image_folder(tmp_path / "images")
    bomb = tmp_path / "images" / "train" / "dog" / "bomb.png"
    bomb.write_bytes(decompression_bomb_png())
    assert_user_error(["train", "--dataset", "imagefolder", "--data-root", str(tmp_path / "images"),
                       "--out", str(tmp_path / "run")], capsys,
                      f"cannot read image {bomb}: it has more than 178,956,970 pixels, PIL's decompression-bomb "
                      "limit; resize it")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_unreadable_image_is_named(tiny_world, tmp_path, capsys, workers):
    image_folder(tmp_path / "images", broken="9.png")
    checkpoint = tmp_path / "teacher.pth"
    torch.save(create_model("resnet8", 2).state_dict(), checkpoint)  # a plain state_dict
    out = tmp_path / "c.zarr"
    args = tiny_world.precompute_args(out, "--image-size", "32")
    for flag, value in (("--dataset", "imagefolder"), ("--data-root", str(tmp_path / "images")),
                        ("--teacher-checkpoint", str(checkpoint)), ("--num-workers", workers)):
        args = replace_flag(args, flag, value)
    assert_user_error(args, capsys, f"cannot read image {tmp_path / 'images' / 'train' / 'dog' / '9.png'}")
    assert_no_complete_store(out)


def test_non_finite_teacher_output(tiny_world, tmp_path, capsys):
    teacher = create_model("resnet8", 100)
    state = teacher.state_dict()
    # Finite weights whose outputs overflow float32; NaN weights are refused as the checkpoint is loaded.
    state["fc.weight"] = torch.full_like(state["fc.weight"], 3e38)
    checkpoint = tmp_path / "overflow.pth"
    torch.save({"model": state}, checkpoint)
    out = tmp_path / "c.zarr"
    assert_user_error(replace_flag(tiny_world.precompute_args(out), "--teacher-checkpoint", str(checkpoint)),
                      capsys, "teacher/logits has NaN or inf values")
    assert_no_complete_store(out)
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    torch.save({"model": state}, checkpoint)
    assert_user_error(replace_flag(tiny_world.precompute_args(out), "--teacher-checkpoint", str(checkpoint)),
                      capsys, f"checkpoint {checkpoint}: 1 weights hold NaN or infinite values: fc.weight")
    assert_no_complete_store(out)


def test_float16_overflow_asks_for_float32(tiny_world, tmp_path, capsys):
    teacher = create_model("resnet8", 100)
    state = teacher.state_dict()
    state["fc.bias"] = torch.full_like(state["fc.bias"], 1e6)
    checkpoint = tmp_path / "huge.pth"
    torch.save({"model": state}, checkpoint)
    args = replace_flag(tiny_world.precompute_args(tmp_path / "c.zarr"), "--teacher-checkpoint", str(checkpoint))
    assert_user_error(args, capsys, "teacher/logits has values beyond the range of float16: use --dtype float32")


def test_malformed_params_file(tiny_world, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    assert_user_error(["precompute", "--config", str(params)], capsys, f"cannot read params file {params}")
    cases = [
        ("precompute", "precompute:\n  views: [1,\n", f"params file {params} is not valid YAML"),
        ("precompute", "precompute:\n  viewz: 3\n", "unknown field 'viewz'"),
        ("precompute", "precompute:\n  views: many\n", "'views' must be int, got 'many'"),
        ("precompute", "precompute:\n  views: null\n",
         "'views' must be int, got null (leave the field out for its default)"),
        ("precompute", "- precompute\n", f"params file {params} must be a mapping of stage sections, found list"),
        ("precompute", "precompute: 3\n", f"params file {params}: section 'precompute' must be a mapping, found int"),
        ("report", "report:\n  runs: [kd, 3]\n", "'runs' must be a list of names, got ['kd', 3]"),
        # A misspelt section, or an empty file, would leave every option at its default unseen.
        ("distill", "distil:\n  epochs: 3\nreport: {}\n",
         f"params file {params} has no 'distill:' section (sections: 'distil', 'report')"),
        ("distill", "", f"params file {params} has no 'distill:' section (sections: none: the file is empty)"),
    ]
    for command, text, message in cases:
        params.write_text(text)
        assert_user_error([command, "--config", str(params)], capsys, message)
    params.write_bytes("precompute:\n  views: 3  # café\n".encode("latin-1"))
    assert_user_error(["precompute", "--config", str(params)], capsys,
                      f"params file {params} is not UTF-8 text (byte 0xe9 at line 2): save it as UTF-8")


def test_params_file_floats_written_without_a_dot(tmp_path, capsys):
    """YAML 1.1 (PyYAML) reads 1e-3 as text; it is the float a user means."""
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    config = build_config(TrainConfig, "train", params)
    assert config.lr == 0.001 and config.weight_decay == 0.0005
    params.write_text("train:\n  lr: fast\n")
    assert_user_error(["train", "--config", str(params)], capsys, f"{params} [train]: 'lr' must be float, got 'fast'")


def test_debug_shows_the_traceback(tiny_world, tmp_path):
    args = replace_flag(tiny_world.precompute_args(tmp_path / "c.zarr"), "--views", "0")
    with pytest.raises(Exception, match="--views must be at least 1"):
        run_cli(["--debug", *args])


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tiny_world, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    evaluate = ["evaluate", "--dataset", "cifar100", "--data-root", str(tiny_world.data_root), "--checkpoint",
                str(tiny_world.teacher_checkpoint), "--arch", tiny_world.teacher_arch, "--device", "cpu"]
    assert_user_error([*evaluate, "--output", str(tmp_path)], capsys,
                      f"--output {tmp_path} is a directory: it must name a file")
    assert_user_error([*evaluate, "--output", str(a_file / "metrics.json")], capsys,
                      f"--output {a_file / 'metrics.json'} cannot be created: {a_file} is a file")
    assert_user_error(["train", "--data-root", str(tiny_world.data_root), "--out", str(a_file)], capsys,
                      f"--out {a_file} is a file: it must name a directory")
    assert_user_error(replace_flag(tiny_world.precompute_args(a_file), "--out", str(a_file)), capsys,
                      f"--out {a_file} is a file: it must name a directory")
    assert a_file.read_text() == "keep me"

    # A read-only file system (a tmpfs mounted read-only in a private mount namespace): refused before any work.
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    commands = {"evaluate": [*evaluate, "--output", str(read_only / "metrics.json")],
                "train": ["train", "--data-root", str(tiny_world.data_root), "--out", str(read_only)]}
    script = f"mount -t tmpfs -o ro tmpfs {read_only}\n" + "".join(
        f"{shlex.join([RICHKD, *args])} 2> {tmp_path}/{name}.err || echo $? > {tmp_path}/{name}.status\n"
        for name, args in commands.items())
    subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-ec", script], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for name, message in (("evaluate", f"--output {read_only / 'metrics.json'} cannot be created: {read_only} is not "
                                       "writable"),
                          ("train", f"--out {read_only} is not writable")):
        assert (tmp_path / f"{name}.status").read_text().strip() == "2"
        assert (tmp_path / f"{name}.err").read_text().strip() == f"error: {message}"


def test_sixteen_bit_grey_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
    # Every 8-bit level, plus a little: each 16-bit value rounds to its 8-bit level.
    levels = np.minimum(np.arange(256).reshape(16, 16) * 257 + 100, 65535).astype(np.uint16)
    (tmp_path / "train" / "grey").mkdir(parents=True)
    Image.fromarray(levels).save(tmp_path / "train" / "grey" / "0.png")
    with Image.open(tmp_path / "train" / "grey" / "0.png") as saved:
        assert saved.mode == "I;16"
    image = open_dataset("imagefolder", tmp_path, "train").image(0)
    assert image.shape == (3, 16, 16)
    assert torch.equal(image, torch.from_numpy(np.arange(256, dtype=np.uint8).reshape(16, 16)).expand(3, 16, 16))
    # Read from a shard (packed with --format original), the same.
    assert torch.equal(decode_image((tmp_path / "train" / "grey" / "0.png").read_bytes(), "0.png"), image)
