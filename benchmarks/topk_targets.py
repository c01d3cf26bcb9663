"""What sparse top-k targets (`richkd precompute --topk K`) cost and lose, against dense logits.

`table`: a 1000-class store of 4,096 samples, written and read through richkd's own store code, for K in
{1, 5, 10, 50} and dense: bytes per (sample, view) on disk (the logits; a store of logits alone, `precompute
--outputs logits`, with each view's random-resized-crop parameters; and every per-view array, with a ResNet-50's
2048-dim features and ViT-L/14's 768-dim embeddings), and the KL divergence KL(dense || rebuilt) of the fused
target (alpha 0.7, CLIP at its own scale) at T = 1 (where the stored rest is exact) and T = 3. The logits are
synthetic, shaped like an ImageNet teacher's (top-1 probability about 0.8 with a handful of confusable classes)
and CLIP's (cosines about 0.18, the label's 0.08 higher): no 1000-class model can be downloaded here. It also
times the sparse KD loss against densifying the batch and taking the dense one.

`demo`: the demo's kd student (variant L) from stores of K = 1, 3 and dense, every seed of params.yaml, test top-1
with the Student-t 95% interval over seeds and the paired difference against dense. Run `dvc repro precompute`
first; it precomputes the top-k stores itself, beside the demo's.

    python benchmarks/topk_targets.py table
    python benchmarks/topk_targets.py demo [--params params.yaml] [--out runs/topk]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from synthetic import IMAGENET_CLASSES, IMAGENET_SOURCES

from richkd.cache.reader import CacheReader, as_tensor
from richkd.cache.schema import VIEW_PARAMS, Layout, stored_arrays
from richkd.cache.writer import CacheWriter
from richkd.cli import run_cli
from richkd.pipeline.config import read_params_section
from richkd.pipeline.fusion import Fusion
from richkd.pipeline.losses import kd_loss
from richkd.pipeline.topk import as_dense, sparse_kd_loss
from richkd.stages.precompute import stored_outputs
from richkd.stages.report import difference_text, estimate, estimate_text

SAMPLES, LOGIT_SCALE = 4096, 100.0
CLASSES, SOURCES = IMAGENET_CLASSES, IMAGENET_SOURCES
# A random resized crop's parameters: top, left, height, width, flip.
CROP_PARAMS = 5
TOPKS = (1, 5, 10, 50, 0)


def imagenet_like_outputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Teacher logits, features and CLIP embeddings and cosines of SAMPLES samples, shaped as described above."""
    labels = torch.randint(0, CLASSES, (SAMPLES,), generator=generator)
    confusable = torch.randint(0, CLASSES, (SAMPLES, 5), generator=generator)
    label_hot = torch.nn.functional.one_hot(labels, CLASSES).float()
    near = torch.zeros(SAMPLES, CLASSES).scatter_(1, confusable, torch.rand(SAMPLES, 5, generator=generator))
    teacher = torch.randn(SAMPLES, CLASSES, generator=generator) + 9 * label_hot + 4 * near
    clip = 0.18 + 0.015 * torch.randn(SAMPLES, CLASSES, generator=generator) + 0.08 * label_hot + 0.04 * near
    return {"teacher/logits": teacher, "clip/logits": clip,
            "teacher/features": torch.randn(SAMPLES, SOURCES[0].dim, generator=generator).relu(),
            "clip/image_embeds": torch.nn.functional.normalize(
                torch.randn(SAMPLES, SOURCES[1].dim, generator=generator), dim=1)}


def write_store(url: str, topk: int, outputs: dict[str, torch.Tensor], stored: str = "all") -> CacheReader:
    """A store of `outputs` (`stored`: all, or logits alone), with random resized crops' parameters."""
    layout = Layout(views=1, samples=SAMPLES, classes=CLASSES, view_params=CROP_PARAMS, shard_size=SAMPLES,
                    chunk_size=1024, precision="float16", topk=topk)
    sources = tuple(dataclasses.replace(source, outputs=stored) for source in SOURCES)
    provenance = {"layout": layout.describe(), "dataset": {}, "views": {},
                  "sources": {source.name: {**source.describe(), "logit_scale": LOGIT_SCALE if source.kind == "clip"
                                            else 1.0} for source in sources}}
    writer = CacheWriter.open(url, layout, provenance, sources)
    scales = {source.logits: provenance["sources"][source.name]["logit_scale"] for source in sources}
    block = {name: values.numpy().astype(writer.arrays[name].dtype)
             for name, values in stored_outputs(outputs, scales, layout).items() if name in writer.arrays}
    generator = np.random.default_rng(0)
    side = generator.integers(64, 500, (SAMPLES, 2))
    crops = np.column_stack([generator.integers(0, 100, (SAMPLES, 2)), side, generator.integers(0, 2, SAMPLES)])
    writer.write_block(0, 0, {VIEW_PARAMS: crops.astype(np.int32), **block})
    return CacheReader(url)


def kl(reference: torch.Tensor, rebuilt: torch.Tensor, temperature: float) -> float:
    """Mean KL(softmax(reference / T) || softmax(rebuilt / T)) over samples."""
    log_p, log_q = (torch.log_softmax(x.double() / temperature, dim=1) for x in (reference, rebuilt))
    return float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())


def fusion_and_targets(reader: CacheReader, samples: int) -> tuple[Fusion, dict[str, torch.Tensor]]:
    """The fusion the table measures (alpha 0.7, CLIP at LOGIT_SCALE), and the stored arrays it reads of the first
    `samples` samples."""
    layout = reader.layout
    fusion = Fusion(((reader.source("teacher"), 0.7, 1.0), (reader.source("clip"), 1 - 0.7, LOGIT_SCALE)),
                    topk=layout.topk, classes=layout.classes)
    return fusion, {name: as_tensor(reader.read(name, 0, samples, 0)) for name in fusion.arrays}


def fused_target(reader: CacheReader) -> torch.Tensor:
    fusion, targets = fusion_and_targets(reader, SAMPLES)
    return as_dense(fusion.fuse(targets))


def per_view_arrays(reader: CacheReader) -> tuple[str, ...]:
    return (VIEW_PARAMS, *(name for source in reader.sources.values()
                           for name in source.per_view_arrays(reader.layout.topk)))


def stored_bytes(reader: CacheReader, names: tuple[str, ...]) -> float:
    return sum(reader.array(name).nbytes_stored() for name in names) / SAMPLES


def time_losses(reader: CacheReader, batch: int = 256, repeats: int = 300) -> tuple[float, float]:
    """ms per batch, forward and backward, of the sparse KD loss and of densifying the fused target then the dense
    KD loss (the fusion itself, the same for both, not timed)."""
    fusion, targets = fusion_and_targets(reader, batch)
    fused = fusion.fuse(targets)
    student = torch.randn(batch, CLASSES, requires_grad=True)
    losses = (lambda: sparse_kd_loss(student, fused, 3.0), lambda: kd_loss(student, fused.dense(), 3.0))
    timings = []
    for loss in losses:
        for _ in range(20):  # warm-up
            loss().backward()
        started = time.perf_counter()
        for _ in range(repeats):
            loss().backward()
        timings.append(1000 * (time.perf_counter() - started) / repeats)
    return timings[0], timings[1]


def table() -> None:
    torch.set_num_threads(1)
    outputs = imagenet_like_outputs(torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        readers = {topk: write_store(f"{folder}/top{topk}.zarr", topk, outputs) for topk in TOPKS}
        logits_only = {topk: write_store(f"{folder}/logits{topk}.zarr", topk, outputs, "logits") for topk in TOPKS}
        dense = readers[0]
        reference = fused_target(dense)
        confidence = torch.softmax(outputs["teacher/logits"], dim=1).max(dim=1).values.mean()
        print(f"{CLASSES} classes, {SAMPLES} samples, float16; the teacher's mean top-1 probability "
              f"{confidence:.2f}; fused: alpha 0.7, CLIP at scale {LOGIT_SCALE:g}; rest exact at T = 1\n")
        print("bytes per (sample, view) on disk, and what the fused target loses\n")
        print("| K | logits | logits-only store (--outputs logits) | full store | KL fused, T = 1 | KL fused, T = 3 |")
        print("|---|---:|---:|---:|---:|---:|")
        for topk, reader in readers.items():
            logit_names = stored_arrays(tuple(source.logits for source in SOURCES), topk)
            rebuilt = fused_target(reader)
            print(f"| {topk or 'dense'} | {stored_bytes(reader, logit_names):,.0f} | "
                  f"{stored_bytes(logits_only[topk], per_view_arrays(logits_only[topk])):,.0f} | "
                  f"{stored_bytes(reader, per_view_arrays(reader)):,.0f} | "
                  f"{kl(reference, rebuilt, 1.0):.2e} | {kl(reference, rebuilt, 3.0):.2e} |")
        sparse_ms, dense_ms = time_losses(readers[10])
        print(f"\nKD loss on the fused target at K = 10, a batch of 256, forward and backward on one core: sparse "
              f"{sparse_ms:.2f} ms, densified then dense {dense_ms:.2f} ms")


def demo(params: str, out: Path) -> None:
    precompute = read_params_section(params, "precompute")
    distill = read_params_section(params, "distill")
    store = Path(precompute["out"])
    top1 = {}
    for topk in (1, 3, 0):
        cache = store if not topk else store.with_name(f"{store.stem}-top{topk}.zarr")
        if topk:
            status = run_cli(["precompute", "--config", params, "--topk", str(topk), "--topk-temperature",
                              str(distill["temperature"]), "--out", str(cache)])
            if status:
                raise SystemExit(status)
        run = out / f"top{topk or 'dense'}"
        status = run_cli(["distill", "--config", params, "--variant", "L", "--cache", str(cache), "--out", str(run),
                          "--overwrite"])
        if status:
            raise SystemExit(status)
        top1[topk] = [json.loads((run / f"seed-{seed}" / "summary.json").read_text())["last"]["test"]["top1"]
                      for seed in str(distill["seeds"]).split(",")]
    print(f"\nthe demo's kd student (variant L), {distill['epochs']} epochs, test top-1 over "
          f"{len(top1[0])} seeds (mean ± 95% interval; paired difference against dense):")
    print("| targets | top-1 | vs dense |\n|---|---:|---:|")
    for topk, values in top1.items():
        paired = estimate([value - dense for value, dense in zip(values, top1[0])])
        print(f"| {f'top-{topk}' if topk else 'dense'} | {estimate_text('top1', estimate(values))} | "
              f"{difference_text('top1', paired) if topk else '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("table", "demo"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="runs/topk", type=Path)
    args = parser.parse_args()
    if args.part == "table":
        table()
    else:
        demo(args.params, args.out)


if __name__ == "__main__":
    main()
