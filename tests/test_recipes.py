"""The ImageNet recipe end to end: a tiny ImageFolder of JPEGs, a tiny timm teacher saved as a plain state_dict (as
torchvision's and timm's weight files are), a tiny CLIP; the recipe's every other setting as it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import zarr
from conftest import TINY_CLIP
from PIL import Image

from richkd.cli import run_cli
from richkd.pipeline.models import create_model

RECIPE = str(Path(__file__).parents[1] / "recipes" / "imagenet.yaml")
CLASSES = 12  # more than the recipe's top-k of 10


def write_jpeg_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 1)):
        for label in range(CLASSES):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (48 + 4 * i, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"n{label:08d}_{i}.JPEG", quality=90)


def test_the_imagenet_recipe_runs_end_to_end(tiny_world, tmp_path, capsys):
    data = tmp_path / "imagenet"
    write_jpeg_folder(data)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save(create_model("timm:test_resnet", CLASSES).state_dict(), teacher)
    execution = ["--num-workers", "0", "--device", "cpu"]
    models = ["--teacher", "timm:test_resnet", "--teacher-checkpoint", str(teacher), "--clip", TINY_CLIP,
              "--clip-pretrained", str(tiny_world.clip_checkpoint)]
    store, val_store = tmp_path / "imagenet.zarr", tmp_path / "imagenet_val.zarr"
    precompute = ["precompute", "--config", RECIPE, "--data-root", str(data), *models, "--views", "2",
                  "--shard-size", "16", "--batch-size", "8", *execution]
    assert run_cli([*precompute, "--out", str(store)]) == 0
    assert run_cli([*precompute, "--split", "val", "--views", "1", "--view-policy", "center",
                    "--out", str(val_store)]) == 0
    group = zarr.open_group(store, mode="r")
    assert group.attrs["layout"]["topk"] == 10 and group["teacher/topk_classes"].shape == (2, 36, 10)
    assert "teacher/features" not in group and group.attrs["sources"]["teacher"]["outputs"] == "logits"
    assert group.attrs["views"]["policy"] == "resized_crop" and group.attrs["views"]["size"] == 224

    runs, evals = tmp_path / "runs", tmp_path / "evals"
    student = ["--data-root", str(data), "--arch", "timm:test_efficientnet", "--epochs", "2", "--batch-size", "8",
               "--val-fraction", "0.1", *execution]
    assert run_cli(["distill", "--config", RECIPE, "--cache", str(store), *student, "--out", str(runs / "kd")]) == 0
    assert run_cli(["train", "--config", RECIPE, *student, "--out", str(runs / "ce")]) == 0
    for name in ("kd", "ce"):
        assert run_cli(["evaluate", "--config", RECIPE, "--data-root", str(data), *execution, "--checkpoint",
                        str(runs / name / "seed-0" / "checkpoints" / "best.pt"),
                        "--output", str(evals / f"{name}.json")]) == 0
        evaluation = json.loads((evals / f"{name}.json").read_text())
        assert evaluation["split"] == "val" and evaluation["count"] == CLASSES
    capsys.readouterr()
    assert run_cli(["report", "--config", RECIPE, "--evals", str(evals), "--test-cache", str(val_store),
                    "--out", str(tmp_path / "report"), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["splits"]["val"]["runs"]
    assert {"kd", "ce"} <= runs.keys() and any("clip" in name.lower() for name in runs)
