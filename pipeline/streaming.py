"""`--stream` training: the training shards read front to back, by `richkd distill` with their samples' cache rows,
by `richkd train` with their labels alone.

A store precomputed from the same shards holds their samples in shard order, so reading a shard walks a
run of consecutive store rows: the tar shards and the store are both read sequentially, and no index of the
shards is needed (`pipe:` commands work). The shard order is shuffled every epoch, and samples pass through
a bounded shuffle buffer (webdataset's) before their views are made. Every streamed sample is found in the
store by its key, which must be stored there with the same class.

Memory is bounded at any dataset size: a loader process holds its shuffle buffer (encoded images and their
targets) and the last few chunks it read from the store.

`richkd train` has no store: it reads the shards once first (`scan_shards`) for their keys and labels, and checks
every sample it streams against them.

Processes and loader workers split the shards: process r streams shards r, r + R, ... of the epoch's order
and its k-th active worker every k-th of those. One process streams every sample exactly once an epoch.
Several processes must run as many batches, so each takes ceil(N / R) samples, cycling through its shards or
stopping inside them, as webdataset's `with_epoch` does.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
import webdataset
from torch.utils.data import IterableDataset, get_worker_info

from richkd.cache.reader import CacheReader, KeyIndex, as_tensor
from richkd.cache.schema import PER_SAMPLE_ARRAYS, VIEW_PARAMS
from richkd.pipeline.data import ImageDataset
from richkd.pipeline.errors import UserError
from richkd.pipeline.runtime import Part
from richkd.pipeline.seeding import ORDER, SHUFFLE, seeded_generator
from richkd.pipeline.shards import decode_image, shard_starts, stream_shard
from richkd.pipeline.views import image_for_views, sample_view

# Store chunks a loader process keeps: the one being read and a few behind it, which the samples still
# in flight from a shard boundary may need.
HELD_CHUNKS = 4


class StoreRows:
    """Rows of one view of a store, read a chunk at a time, the last few chunks kept."""

    def __init__(self, reader: CacheReader, view: int, names: tuple[str, ...]):
        self.reader, self.view = reader, view
        self.names = (*PER_SAMPLE_ARRAYS, VIEW_PARAMS, *names)
        self.chunk_size = min(reader.layout.chunk_size, reader.layout.shard_size)
        self.chunks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def row(self, row: int) -> dict[str, np.ndarray]:
        chunk, offset = divmod(row, self.chunk_size)
        if chunk in self.chunks:
            self.chunks.move_to_end(chunk)
        else:
            if len(self.chunks) == HELD_CHUNKS:
                self.chunks.popitem(last=False)
            start = chunk * self.chunk_size
            stop = min(start + self.chunk_size, self.reader.layout.samples)
            self.chunks[chunk] = {name: self.reader.read(name, start, stop,
                                                         None if name in PER_SAMPLE_ARRAYS else self.view)
                                  for name in self.names}
        # Copies: a sample waiting in the shuffle buffer must not keep its whole chunk alive.
        return {name: np.array(values[offset]) for name, values in self.chunks[chunk].items()}


def shard_sizes_by_start(shard_sizes: list[int] | None) -> dict[int, int] | None:
    """{first store row: samples} of the non-empty shards a store was precomputed from (None: it does not record
    them)."""
    if shard_sizes is None:
        return None
    starts = shard_starts(shard_sizes)[:-1].tolist()
    return {int(start): size for start, size in zip(starts, shard_sizes) if size}


def epoch_shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The shards in the order an epoch streams them."""
    return [urls[i] for i in torch.randperm(len(urls), generator=seeded_generator(seed, epoch, ORDER))]


class ShardEpoch(IterableDataset):
    """One epoch of one process's shards, read by its loader workers through shuffle buffers: the samples `_read_shard`
    finds in each shard, made training items by `item`."""

    def __init__(self, urls: list[str], num_classes: int, samples: int, part: Part, workers: int, buffer: int,
                 seed: int, epoch: int):
        """`urls`: every shard in this epoch's order; `samples`: how many they hold; `workers`: the loader's."""
        super().__init__()
        self.urls, self.num_classes, self.samples, self.part = urls, num_classes, samples, part
        self.buffer, self.seed, self.epoch = buffer, seed, epoch
        # Every process must have as many active workers for all to make as many batches.
        self.streams = min(max(workers, 1), len(urls) // part.count)
        if self.streams == 0:
            raise UserError(f"--stream gives every process its own shards: {len(urls)} shards cannot be split "
                            f"over {part.count} processes")

    def __len__(self) -> int:
        """Samples this process trains on in the epoch."""
        return self.samples if self.part.count == 1 else -(-self.samples // self.part.count)

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if worker >= self.streams:
            return
        self.start_worker()
        samples = self._read(self.urls[self.part.index::self.part.count][worker::self.streams])
        if self.part.count > 1:
            share = len(self)
            samples = islice(samples, share // self.streams + (worker < share % self.streams))
        rng = random.Random(seeded_generator(self.seed, self.epoch, SHUFFLE, self.part.index, worker).initial_seed())
        for sample in webdataset.filters.shuffle(self.buffer, self.buffer, rng=rng)(samples):
            yield self.item(sample)

    def start_worker(self) -> None:
        """Open what a loader worker reads besides the shards."""

    @abstractmethod
    def item(self, sample: tuple) -> tuple:
        """The training item of a sample, in a loader worker."""

    @abstractmethod
    def _read_shard(self, url: str) -> Iterator[tuple]:
        """The samples of one shard, as `item` takes them, in tar order."""

    def _read(self, urls: list[str]) -> Iterator[tuple]:
        """Every sample of `urls`, once, or round and round when several processes each take a fixed share."""
        while True:
            streamed = 0
            for url in urls:
                for sample in self._read_shard(url):
                    streamed += 1
                    yield sample
            if self.part.count == 1:
                return
            if streamed == 0:
                raise UserError(f"the shards {', '.join(urls)} hold no samples")

    def check_epoch(self, seen: int) -> None:
        """One process streams every sample once: as many as the shards held."""
        if self.part.count == 1 and seen != self.samples:
            raise UserError(self.miscount(seen))

    @abstractmethod
    def miscount(self, seen: int) -> str:
        """Why an epoch that streamed `seen` samples is refused."""


class ShardStream(ShardEpoch):
    """One epoch of one process's shards for distill: (uint8 view, class id, store row, targets) per sample."""

    def __init__(self, urls: list[str], num_classes: int, cache: str, view: int, names: tuple[str, ...],
                 key_index: KeyIndex, policy, part: Part, workers: int, buffer: int, seed: int, epoch: int):
        """`names`: the target arrays."""
        super().__init__(urls, num_classes, key_index.size, part, workers, buffer, seed, epoch)
        self.cache, self.view, self.names, self.key_index, self.policy = cache, view, names, key_index, policy

    def start_worker(self) -> None:
        reader = CacheReader(self.cache)
        self.rows = StoreRows(reader, self.view, self.names)
        recorded = reader.attrs["dataset"].get("shard_sizes")
        self.empty_shard_recorded = recorded is not None and 0 in recorded
        self.sizes = shard_sizes_by_start(recorded)
        self.image_size = reader.attrs["dataset"].get("image_size")  # None: of several sizes, or not recorded

    def item(self, sample: tuple) -> tuple[torch.Tensor, int, int, dict[str, torch.Tensor]]:
        name, label, row, encoded, params, targets = sample
        image = decode_image(encoded, name)
        side = self.image_size
        if side is not None and image.shape[1:] != (side, side):
            raise UserError(f"image {name} is {image.shape[2]} x {image.shape[1]}, where the cache {self.cache} was "
                            f"precomputed from {side} x {side} images: its stored views would be cut from other "
                            "pixels; stream the shards it was precomputed from, or precompute again from these")
        view = self.policy.replay(image, params)
        return view, label, row, {array: as_tensor(values) for array, values in targets.items()}

    def _read_shard(self, url: str) -> Iterator[tuple]:
        """The samples of one shard with their targets. A shard read to its end must hold the samples of one
        shard the store was precomputed from (`self.sizes`: its shards' sizes by first row, when it records them),
        so that every process checks its own shards and no sample goes missing unnoticed on any of them."""
        first, count = None, 0
        for key, label, encoded in stream_shard(url, self.num_classes):
            sample = self._with_targets(url, key, label, encoded)
            if first is None:
                first = (key, sample[2])
            count += 1
            yield sample
        if self.sizes is None or (count == 0 and self.empty_shard_recorded):
            return
        if first is None:
            raise UserError(f"shard {url} holds no samples, where every shard the cache {self.cache} was "
                            "precomputed from held some: it is not one of those shards")
        if first[1] not in self.sizes:
            raise UserError(f"shard {url} starts with sample '{first[0]}', row {first[1]} of the cache {self.cache}, "
                            "where no shard it was precomputed from starts: it is not one of those shards")
        if count != self.sizes[first[1]]:
            raise UserError(f"shard {url} streamed {count} samples where the shard the cache {self.cache} was "
                            f"precomputed from held {self.sizes[first[1]]}: it has changed since; restore it or "
                            "precompute again")

    def _with_targets(self, url: str, key: str, label: int, encoded: bytes) -> tuple:
        row = int(self.key_index.rows([key])[0])
        stored = self.rows.row(row) if row >= 0 else None
        if stored is None or str(stored["keys"]) != key:
            raise UserError(f"sample '{key}' in {url} is not in the cache {self.cache}: it was precomputed from "
                            "other samples")
        if int(stored["labels"]) != label:
            raise UserError(f"sample '{key}' in {url} has class {label}, the cache {self.cache} class "
                            f"{int(stored['labels'])}: it was precomputed from other data")
        targets = {name: stored[name] for name in self.names}
        return f"{key} in {url}", label, row, encoded, stored[VIEW_PARAMS], targets

    def miscount(self, seen: int) -> str:
        return (f"the shards streamed {seen} samples and the cache {self.cache} holds {self.samples}: it was "
                "precomputed from other shards")


class LabelStream(ShardEpoch):
    """One epoch of one process's shards for train: (fresh random uint8 view, class id, sample index) per sample of
    `dataset`, the split as `scan_shards` read it from the shards (`urls` in any order)."""

    def __init__(self, urls: list[str], dataset: ImageDataset, first_rows: dict[str, int], policy, part: Part,
                 workers: int, buffer: int, seed: int, epoch: int):
        """`first_rows`: each shard's first sample index."""
        super().__init__(urls, len(dataset.class_names), len(dataset), part, workers, buffer, seed, epoch)
        self.dataset, self.first_rows, self.policy = dataset, first_rows, policy

    def _read_shard(self, url: str) -> Iterator[tuple]:
        row = self.first_rows[url]
        for row, (key, label, encoded) in enumerate(stream_shard(url, self.num_classes), row):
            if row >= len(self.dataset) or (key, label) != (self.dataset.keys[row], self.dataset.labels[row]):
                raise UserError(f"shard {url} changed since it was first read: sample '{key}' of class {label} is "
                                "not where it was; train again from shards that stay as they are")
            yield f"{key} in {url}", label, row, encoded

    def item(self, sample: tuple) -> tuple[torch.Tensor, int, int]:
        name, label, row, encoded = sample
        image = image_for_views(self.dataset, self.policy, row, decode_image(encoded, name))
        return self.policy.replay(image, sample_view(self.policy, self.seed, self.epoch, row, image)), label, row

    def miscount(self, seen: int) -> str:
        return (f"the shards streamed {seen} samples where they held {self.samples} when first read: they have "
                "changed since; train again from shards that stay as they are")
