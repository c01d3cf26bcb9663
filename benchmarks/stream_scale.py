"""Streaming distillation targets from ImageNet-sized caches: rows per second, a student's pace, and memory.

Builds real richkd stores (`Layout` + `CacheWriter`) of ImageNet's shape: 1000 classes, 2048-d teacher
features (resnet50's), 768-d CLIP embeddings (ViT-L/14's), float16, one view, shards of 4096 samples
(precompute's default), at two sizes, filled block by block with random normal values. Blosc gains
little on such values (the script prints how much), and real teacher outputs' low mantissa bits are as
noisy, so reading them is close to the worst case.

Each store is then read as `richkd distill --variant LF` reads a view too large for its memory budget:
`CacheReader.open_view(view, names, order, in_memory=False)` in `block_shuffled_order`, then `gather()`
of every batch in that order. Every read runs in a fresh process, after the store's files are dropped
from the page cache (so it reads from disk), and reports rows per second, the CPU time it used and its
peak resident memory above the process's baseline after imports. The student's pace is a real training
step (forward, backward, SGD step; channels_last, as `richkd train` and `richkd distill` run it) at
224x224: reading is not the bottleneck when it delivers rows far faster than the student consumes them.

    python benchmarks/stream_scale.py [--sizes 200000 400000] [--rounds 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset
from synthetic import IMAGENET_CLASSES, IMAGENET_SOURCES

from richkd.cache.reader import CacheReader, StreamedView, block_shuffled_order
from richkd.cache.schema import Layout, store_arrays
from richkd.cache.writer import CacheWriter
from richkd.pipeline.models import create_model
from richkd.pipeline.runtime import Part
from richkd.pipeline.seeding import ORDER, seeded_generator
from richkd.pipeline.streaming import HELD_CHUNKS, ShardStream, StoreRows
from richkd.pipeline.training import make_optimizer
from richkd.pipeline.training_options import TrainingOptions
from richkd.stages.distill import DistillConfig, cached_arrays, crd_weights, logit_fusion

PARAMS = 5
CLASSES, SOURCES = IMAGENET_CLASSES, IMAGENET_SOURCES
MB = 1e6
GB = 1e9


def imagenet_layout(samples: int, shard_size: int) -> Layout:
    return Layout(views=1, samples=samples, classes=CLASSES, view_params=PARAMS, shard_size=shard_size,
                  chunk_size=min(1024, shard_size), precision="float16")


def raw_nbytes(layout: Layout, names: tuple[str, ...]) -> int:
    """Bytes of the arrays `names`, decompressed."""
    specs = store_arrays(layout, SOURCES)
    return sum(int(np.prod(specs[name].shape)) * np.dtype(specs[name].dtype).itemsize for name in names)


def store_nbytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def build_store(path: Path, layout: Layout) -> float:
    """A complete store of random values, written block by block as precompute writes it; returns seconds."""
    started = time.perf_counter()
    provenance = {
        "layout": layout.describe(),
        "dataset": {"name": "synthetic-imagenet", "split": "train", "num_samples": layout.samples},
        "views": {"policy": "random-resized-crop", "seed": 0, "count": layout.views},
        "sources": {"teacher": {**SOURCES[0].describe(), "arch": "random"},
                    "clip": {**SOURCES[1].describe(), "model": "random", "logit_scale": 100.0}},
    }
    writer = CacheWriter.open(str(path), layout, provenance, SOURCES)
    clip = SOURCES[1]
    rng = np.random.default_rng(layout.samples)
    writer.write_static({
        "labels": rng.integers(0, layout.classes, layout.samples),
        "keys": np.char.mod("%08d", np.arange(layout.samples)),
        clip.class_embeds: rng.standard_normal((layout.classes, clip.dim), dtype=np.float32),
        clip.prompt_embeds: rng.standard_normal((layout.classes, clip.prompts, clip.dim), dtype=np.float32),
    })
    specs = store_arrays(layout, SOURCES)
    for view, shard in layout.blocks():
        start, stop = layout.shard_range(shard)
        outputs = {}
        for name in writer.per_view_arrays:
            shape, dtype = (stop - start, specs[name].shape[-1]), np.dtype(specs[name].dtype)
            if dtype.kind == "f":
                outputs[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
            else:
                outputs[name] = rng.integers(0, 224, shape, dtype=dtype)
        writer.write_block(view, shard, outputs)
    return time.perf_counter() - started


def drop_from_page_cache(path: Path) -> None:
    """Flush the store's files and evict them from the page cache, so that the next read comes from disk."""
    for file in path.rglob("*"):
        if file.is_file():
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.fsync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def read_view(reader: CacheReader, names: tuple[str, ...], batch_size: int, epoch: int, buffer: int) -> int:
    """View 0 as distill reads a view too large for --cache-memory; returns the rows read."""
    order = block_shuffled_order(reader.layout, seeded_generator(0, epoch, ORDER))
    view = reader.open_view(0, names, order, in_memory=False)
    for first in range(0, len(order), batch_size):
        view.gather(order[first:first + batch_size])
    view.close()
    return len(order)


def read_as_streamed(reader: CacheReader, names: tuple[str, ...], batch_size: int, epoch: int, buffer: int) -> int:
    """View 0 as `distill --stream` reads it while its tar shards (here: of 4096 samples, in a shuffled
    order) arrive: every sample looked up by key and checked, its row read a chunk at a time, held in the
    shuffle buffer and made float32 tensors. Image decoding is left out: only the store's side is timed."""
    layout = reader.layout
    labels = reader.read("labels", 0, layout.samples)
    stream = ShardStream(["shard"], layout.classes, reader.url, 0, names, reader.key_index(), None, Part(), 0,
                         buffer, 0, epoch)
    rows = StoreRows(reader, 0, names)
    shards = torch.randperm(layout.num_shards, generator=seeded_generator(0, epoch, ORDER)).tolist()
    samples = (stream._with_targets("shard", f"{row:08d}", int(labels[row]), b"", rows)
               for shard in shards for row in range(*layout.shard_range(shard)))
    streamed = 0
    for *_, targets in webdataset.filters.shuffle(buffer, buffer, rng=random.Random(epoch))(samples):
        tensors = {name: torch.from_numpy(values.astype(np.float32)) for name, values in targets.items()}
        streamed += len(tensors) == len(names)
    return streamed


READERS = {"view": read_view, "stream": read_as_streamed}


def read_epoch(store: str, reader_name: str, names: tuple[str, ...], batch_size: int, epoch: int,
               buffer: int) -> dict[str, float]:
    """One epoch of view 0 read by `reader_name`; run in a fresh process, whose peak RSS it measures."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS: the baseline after imports
    baseline = status_kib("VmRSS")
    started, cpu_started = time.perf_counter(), time.process_time()
    reader = CacheReader(store)
    reader.require_complete()
    rows = READERS[reader_name](reader, names, batch_size, epoch, buffer)
    seconds = time.perf_counter() - started
    return {"rows_per_second": rows / seconds, "cpu_seconds": time.process_time() - cpu_started,
            "seconds": seconds, "peak_growth": (status_kib("VmHWM") - baseline) * 1024,
            "load": os.getloadavg()[0]}


def student_step_seconds(model: torch.nn.Module, classes: int, batch_size: int, side: int, warmup: int,
                         steps: int) -> list[float]:
    """Seconds of each timed training step (forward, cross-entropy, backward, the default SGD step) of `model`
    on `side` x `side` images, channels-last as the Trainer runs it."""
    torch.manual_seed(0)
    model = model.to(memory_format=torch.channels_last).train()
    options = TrainingOptions()
    optimizer = make_optimizer(model.parameters(), options)
    images = torch.randn(batch_size, 3, side, side).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch_size,))
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        logits, _ = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def load() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 400_000], help="samples per store")
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256, help="indices per gather()")
    parser.add_argument("--rounds", type=int, default=3, help="epochs read per store, each in a fresh process")
    parser.add_argument("--student", default="tv:resnet18")
    parser.add_argument("--student-batch-size", type=int, default=32)
    parser.add_argument("--student-warmup", type=int, default=3)
    parser.add_argument("--student-steps", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="where the stores are built (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the stores instead of deleting them")
    parser.add_argument("--readers", nargs="+", choices=sorted(READERS), default=["view", "stream"],
                        help="view: distill's streamed view; stream: distill --stream's row by row reading")
    parser.add_argument("--shuffle-buffer", type=int, default=4096, help="distill --stream's shuffle buffer")
    args = parser.parse_args()

    layouts = [imagenet_layout(samples, args.shard_size) for samples in args.sizes]
    workdir = Path(tempfile.mkdtemp(prefix="stream_scale_", dir=args.workdir))
    needed = [raw_nbytes(layout, tuple(store_arrays(layout, SOURCES))) for layout in layouts]
    need = sum(needed) if args.keep else max(needed)
    free = shutil.disk_usage(workdir).free
    print(f"{load()}; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"disk: up to {need / GB:.1f} GB needed in {workdir} (stores uncompressed"
          f"{', all kept' if args.keep else ', one at a time'}), {free / GB:.1f} GB free")
    if free < need:
        shutil.rmtree(workdir)
        raise SystemExit(f"not enough free disk space in {workdir}: choose another --workdir or smaller --sizes")

    step_times = student_step_seconds(create_model(args.student, CLASSES), CLASSES, args.student_batch_size, 224,
                                      args.student_warmup, args.student_steps)
    student_rate = args.student_batch_size / statistics.median(step_times)
    print(f"student {args.student}, batch {args.student_batch_size}, 224x224, train step: "
          f"{student_rate:.1f} img/s (median of {len(step_times)} steps: "
          f"{', '.join(f'{t:.2f}' for t in step_times)} s); {load()}")

    prefetch = inspect.signature(StreamedView.__init__).parameters["prefetch"].default
    results = []
    try:
        for layout in layouts:
            store = workdir / f"imagenet_{layout.samples}.zarr"
            write_seconds = build_store(store, layout)
            config, reader = DistillConfig(variant="LF"), CacheReader(str(store))
            names = cached_arrays(logit_fusion(config, reader), crd_weights(config, reader), reader)
            compression = store_nbytes(store) / raw_nbytes(layout, tuple(store_arrays(layout, SOURCES)))
            print(f"{layout.samples} samples: {layout.num_shards} shards, {store_nbytes(store) / GB:.2f} GB on disk "
                  f"({compression:.0%} of raw), written in {write_seconds:.0f} s; {load()}")
            for reader_name in args.readers:
                reads = []
                for epoch in range(args.rounds):
                    drop_from_page_cache(store)
                    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                        read = pool.submit(read_epoch, str(store), reader_name, names, args.batch_size, epoch,
                                           args.shuffle_buffer).result()
                    reads.append(read)
                    print(f"  {reader_name} epoch {epoch}: {read['rows_per_second']:8.0f} rows/s, "
                          f"{read['seconds']:.1f} s wall, {read['cpu_seconds']:.1f} s CPU, "
                          f"peak RSS +{read['peak_growth'] / MB:.0f} MB, load {read['load']:.2f}")
                results.append((layout, reader_name, compression, reads))
            if not args.keep:
                shutil.rmtree(store)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.keep:
        print(f"stores kept in {workdir}")

    shard_bytes = raw_nbytes(imagenet_layout(args.shard_size, args.shard_size), names)
    bound = (prefetch + 2 + 1) * shard_bytes
    print(f"\narrays read (distill --variant LF): {', '.join(names)}; {shard_bytes / args.shard_size:.0f} B/row, "
          f"{shard_bytes / MB:.1f} MB per shard decompressed")
    print(f"design bound on held targets (view): ({prefetch} queued + 2 held for gathering + 1 being read) "
          f"shards x {shard_bytes / MB:.1f} MB = {bound / MB:.0f} MB, whatever the store's size")
    print(f"design bound on held targets (stream): a shuffle buffer of {args.shuffle_buffer} rows x "
          f"{shard_bytes / args.shard_size:.0f} B + {HELD_CHUNKS} chunks of 1024 rows = "
          f"{(args.shuffle_buffer + HELD_CHUNKS * 1024) * shard_bytes / args.shard_size / MB:.0f} MB")
    print(f"\n{'samples':>8} {'reader':>6} {'targets GB':>10} {'on disk':>8} {'rows/s':>8} {'CPU us/row':>10} "
          f"{'rows/s / student img/s':>23} {'read CPU / step':>15} {'peak RSS +MB':>12}")
    for layout, reader_name, compression, reads in results:
        rate = statistics.median(read["rows_per_second"] for read in reads)
        cpu_per_row = statistics.median(read["cpu_seconds"] for read in reads) / layout.samples
        peak = max(read["peak_growth"] for read in reads)
        print(f"{layout.samples:>8} {reader_name:>6} {raw_nbytes(layout, names) / GB:>10.2f} {compression:>8.0%} "
              f"{rate:>8.0f} "
              f"{cpu_per_row * 1e6:>10.1f} {rate / student_rate:>23.0f} {cpu_per_row * student_rate:>15.2%} "
              f"{peak / MB:>12.0f}")
    print(f"(medians of {args.rounds} epochs each, read from disk; peak RSS: the largest; read CPU / step: "
          f"CPU time spent reading per image over the student's step time per image); {load()}")


if __name__ == "__main__":
    main()
