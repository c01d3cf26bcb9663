"""Shared test worlds: tiny datasets in real on-disk formats, a tiny teacher and a tiny CLIP, saved as files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import open_clip  # noqa: E402
import torch  # noqa: E402

from richkd.pipeline.data import write_cifar  # noqa: E402
from richkd.pipeline.models import create_model  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
# The per-view arrays of a dense store precompute writes with its teacher and CLIP, and the others.
PER_VIEW_ARRAYS = ("views/params", "teacher/logits", "teacher/features", "clip/image_embeds", "clip/logits")
STATIC_ARRAYS = ("labels", "keys", "clip/class_embeds", "clip/prompt_embeds")

TINY_CLIP = "richkd-test-tiny"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 40, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_cifar100(root: Path, train: int, test: int, seed: int = 0, classes: int = 100) -> list[str]:
    """A CIFAR-100 folder in torchvision's on-disk format, with random images."""
    rng = np.random.default_rng(seed)
    names = [f"thing_{i:02d}" for i in range(classes)]
    splits = {split: (rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, count))
              for split, count in (("train", train), ("test", test))}
    write_cifar(root, "cifar100", splits, names)
    return names


def register_tiny_clip(directory: Path) -> None:
    path = directory / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)


@dataclass
class TinyWorld:
    data_root: Path
    class_names: list[str]
    teacher_arch: str
    teacher_checkpoint: Path
    clip_checkpoint: Path
    clip_bundle: Path

    def precompute_args(self, out: Path, *extra: str) -> list[str]:
        return [
            "precompute", "--dataset", "cifar100", "--data-root", str(self.data_root),
            "--teacher", self.teacher_arch, "--teacher-checkpoint", str(self.teacher_checkpoint),
            "--clip", TINY_CLIP, "--clip-pretrained", str(self.clip_checkpoint),
            "--views", "2", "--shard-size", "16", "--batch-size", "8", "--num-workers", "0",
            "--device", "cpu", "--out", str(out), *extra,
        ]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    """CIFAR-100 with 40 train and 20 test images, a resnet8 teacher checkpoint and a tiny CLIP."""
    root = tmp_path_factory.mktemp("world")
    names = write_cifar100(root / "data", train=40, test=20)
    torch.manual_seed(0)
    teacher = create_model("resnet8", 100)
    teacher_checkpoint = root / "resnet8_teacher.pth"
    torch.save({"model": teacher.state_dict(), "epoch": 240}, teacher_checkpoint)  # mdistiller's format

    register_tiny_clip(root)
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP)
    clip_checkpoint = root / "tiny_clip.pt"
    torch.save(clip.state_dict(), clip_checkpoint)
    bundle = root / "tiny_clip_bundle"
    bundle.mkdir()
    (bundle / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    torch.save(clip.state_dict(), bundle / "open_clip_pytorch_model.bin")
    return TinyWorld(root / "data", names, "resnet8", teacher_checkpoint, clip_checkpoint, bundle)

