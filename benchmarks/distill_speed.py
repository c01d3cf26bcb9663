"""Seconds per epoch of a resnet8x4 student: labels alone, distilled from the cache, and distilled online.

(a) cross-entropy only (`richkd train`, and `richkd distill --variant none` on the cache's views): the limit;
(b) `richkd distill --variant LF` from a cache: KD on fused logits + CRD on fused features;
(c) the same losses computed online, running resnet32x4 and CLIP ViT-B-32 (random weights) on every
    batch, as the method's reference implementation does.
All on the same CIFAR-shaped images, on this machine's CPU. Goals: (b)/(a) <= 1.10 and (c)/(b) >= 10.

Epoch times are medians over alternating runs of (a) and (b), as this machine's speed drifts.

    python benchmarks/distill_speed.py [--images 1024] [--epochs 2] [--rounds 2] [--nce-k 16384]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from synthetic import write_synthetic_cifar100, write_teacher

from richkd.cache.reader import CacheReader
from richkd.pipeline.config import build_config
from richkd.pipeline.data import normalize
from richkd.pipeline.datasets import open_dataset
from richkd.pipeline.fusion import fuse_logits
from richkd.pipeline.loading import LabelledViews, data_loader
from richkd.pipeline.losses import FusedCRD, kd_loss
from richkd.pipeline.models import create_model
from richkd.pipeline.views import policy_from_description
from richkd.stages import distill, precompute, train
from richkd.stages.distill import sample_negatives

TRAIN = "(a') richkd train, cross-entropy (fresh random views)"
LIMIT = "(a) richkd distill --variant none (cross-entropy)"
CACHED = "(b) richkd distill --variant LF"


def online_label(clip: str) -> str:
    return f"(c) online: resnet32x4 + {clip} forward on every batch"


def online_epoch_seconds(root: Path, args) -> float:
    """An epoch with teacher and CLIP forward passes on every batch, then the student step.

    With --online-batches, the epoch's time is extrapolated from that many batches (a large CLIP on a CPU
    would take hours for a whole epoch).
    """
    device = torch.device("cpu")
    dataset = open_dataset("cifar100", root / "data", "train")
    reader = CacheReader(str(root / "cache.zarr"))
    # Loaded as precompute loads them (the one-template file precompute used).
    config = build_config(precompute.PrecomputeConfig, "precompute", overrides={
        "templates": str(root / "templates.txt"), "teacher_checkpoint": str(root / "teacher.pth")})
    teacher = precompute.classifier_model("teacher", "resnet32x4", str(root / "teacher.pth"), "auto", dataset, "all",
                                          device)
    clip = precompute.clip_model("clip", args.clip, "random", config, dataset, device)
    models = precompute.Models([teacher, clip], device)
    torch.manual_seed(0)
    student = create_model("resnet8x4", 100).to(memory_format=torch.channels_last)
    crd = FusedCRD(student.feature_dim, {"teacher": teacher.source.dim, "clip": clip.source.dim},
                   {"teacher": 0.7, "clip": 1 - 0.7}, num_data=len(dataset))
    optimizer = torch.optim.SGD([*student.parameters(), *crd.parameters()], lr=0.05, momentum=0.9,
                                weight_decay=5e-4)
    params = reader.read("views/params", 0, reader.layout.samples, view=0)
    policy = policy_from_description(reader.attrs["views"])
    loader = data_loader(LabelledViews(dataset, policy, params), args.batch_size, args.num_workers, device,
                         sampler=torch.randperm(len(dataset)).tolist())
    negatives = np.random.default_rng(0)
    student.train()
    batches = min(args.online_batches or len(loader), len(loader))
    started = time.perf_counter()
    for _, (views, labels, indices) in zip(range(batches), loader):
        # The forward passes the cache saves (cloned out of inference mode to enter the loss graph).
        targets = {name: values.clone() for name, values in models(views).items()}
        logits, features = student(normalize(views, dataset.mean, dataset.std).contiguous(
            memory_format=torch.channels_last))
        fused = fuse_logits([(targets["teacher/logits"], 0.7, 1.0), (targets["clip/logits"], 1 - 0.7, 1.0)])
        negative = sample_negatives(labels.numpy(), np.arange(len(dataset)), dataset.labels, args.nce_k,
                                    negatives)
        contrast = torch.cat([indices[:, None], negative], dim=1)
        loss = (F.cross_entropy(logits, labels) + 3.0 * kd_loss(logits, fused, 3.0)
                + 0.8 * crd(features, {"teacher": targets["teacher/features"], "clip": targets["clip/image_embeds"]},
                            indices, contrast))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) * len(loader) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run of (a) and (b); (c) runs one")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of (a) and (b)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--nce-k", type=int, default=16384)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--clip", default="ViT-B-32", help="CLIP of (c); the cache of (b) is always ViT-B-32's")
    parser.add_argument("--online-batches", type=int, default=None,
                        help="time only this many batches of (c) and extrapolate to the epoch")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_cifar100(root / "data", train=args.images, test=256)
        write_teacher(root / "teacher.pth")
        (root / "templates.txt").write_text("a photo of a {}\n")
        precompute.run(build_config(precompute.PrecomputeConfig, "precompute", overrides=dict(
            data_root=str(root / "data"), teacher_checkpoint=str(root / "teacher.pth"), clip="ViT-B-32",
            clip_pretrained="random", templates=str(root / "templates.txt"), views=1, shard_size=512,
            device="cpu", out=str(root / "cache.zarr"))))

        common = dict(data_root=str(root / "data"), arch="resnet8x4", epochs=args.epochs,
                      batch_size=args.batch_size, num_workers=args.num_workers, device="cpu", overwrite=True)
        epochs: dict[str, list[float]] = {}

        def measure(label: str, summary: dict) -> None:
            epochs.setdefault(label, []).extend(summary["epoch_train_seconds"])

        measure(TRAIN, train.run(build_config(train.TrainConfig, "train", overrides={
            **common, "out": str(root / "train")})))
        # (a) and (b) alternate, so that drift in this machine's speed reaches both alike.
        for _ in range(args.rounds):
            for variant, label in (("none", LIMIT), ("LF", CACHED)):
                measure(label, distill.run(build_config(distill.DistillConfig, "distill", overrides={
                    **common, "cache": str(root / "cache.zarr"), "variant": variant, "nce_k": args.nce_k,
                    "out": str(root / variant)})))
        epochs[online_label(args.clip)] = [online_epoch_seconds(root, args)]

    seconds = {label: statistics.median(values) for label, values in epochs.items()}
    print(json.dumps({"images": args.images, "batch_size": args.batch_size, "nce_k": args.nce_k,
                      "rounds": args.rounds, "epochs_per_run": args.epochs, "torch_threads": torch.get_num_threads()}))
    for label, value in seconds.items():
        runs = ", ".join(f"{v:.2f}" for v in epochs[label])
        print(f"{label:55s} {value:7.2f} s/epoch (median of {runs})")
    print(f"(b)/(a) = {seconds[CACHED] / seconds[LIMIT]:.3f} (goal <= 1.10)")
    extrapolated = f", (c) timed on {args.online_batches} batches" if args.online_batches else ""
    print(f"(c)/(b) = {seconds[online_label(args.clip)] / seconds[CACHED]:.1f} (goal >= 10{extrapolated})")


if __name__ == "__main__":
    main()
