"""What the benchmarks run on: CIFAR-shaped random images on disk and an untrained resnet32x4 teacher.

Speed does not depend on what the weights or pixels are, so nothing needs downloading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from richkd.cache.schema import Source
from richkd.pipeline.data import write_cifar
from richkd.pipeline.models import create_model, save_checkpoint

CLASSES = 100
# An ImageNet store's shape: 1000 classes, a ResNet-50 teacher's 2,048 features and ViT-L/14's 768-d embeddings.
IMAGENET_CLASSES = 1000
IMAGENET_SOURCES = (Source("teacher", "classifier", 2048), Source("clip", "clip", 768, prompts=1))


def write_synthetic_cifar100(root: Path, train: int, test: int) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (train, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, train)
    write_cifar(root, "cifar100", {"train": (images, labels), "test": (images[:test], labels[:test])},
                [f"class {i}" for i in range(CLASSES)])


def write_teacher(path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(create_model("resnet32x4", CLASSES), path, arch="resnet32x4", num_classes=CLASSES)
