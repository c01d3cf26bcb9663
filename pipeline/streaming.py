"""`richkd distill --stream`: the training shards read front to back, with their samples' cache rows.

A store precomputed from the same shards holds their samples in shard order, so reading a shard walks a
run of consecutive store rows: the tar shards and the store are both read sequentially, and no index of the
shards is needed (`pipe:` commands work). The shard order is shuffled every epoch, and samples pass through
a bounded shuffle buffer (webdataset's) before their views are made. Every streamed sample is found in the
store by its key, which must be stored there with the same class.

Memory is bounded at any dataset size: a loader process holds its shuffle buffer (encoded images and their
targets) and the last few chunks it read from the store.

Processes and loader workers split the shards: process r streams shards r, r + R, ... of the epoch's order
and its k-th active worker every k-th of those. One process streams every sample exactly once an epoch.
Several processes must run as many batches, so each takes ceil(N / R) samples, cycling through its shards or
stopping inside them, as webdataset's `with_epoch` does.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
import webdataset
from torch.utils.data import IterableDataset, get_worker_info

from richkd.cache.reader import CacheReader, KeyIndex
from richkd.pipeline.distributed import Part
from richkd.pipeline.errors import UserError
from richkd.pipeline.shards import decode_image, stream_shard
from richkd.pipeline.training import SHUFFLE, seeded_generator

PER_SAMPLE_ARRAYS = ("labels", "keys")
VIEW_PARAMS = "views/params"
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


class ShardStream(IterableDataset):
    """One epoch of one process's shards: (uint8 view, class id, store row, targets) per sample."""

    def __init__(self, urls: list[str], num_classes: int, cache: str, view: int, names: tuple[str, ...],
                 key_index: KeyIndex, policy, part: Part, workers: int, buffer: int, seed: int, epoch: int):
        """`urls`: every shard in this epoch's order; `names`: the target arrays; `workers`: the loader's."""
        super().__init__()
        self.urls, self.num_classes, self.cache, self.view, self.names = urls, num_classes, cache, view, names
        self.key_index, self.policy, self.part, self.buffer = key_index, policy, part, buffer
        self.seed, self.epoch = seed, epoch
        # Every process must have as many active workers for all to make as many batches.
        self.streams = min(max(workers, 1), len(urls) // part.count)
        if self.streams == 0:
            raise UserError(f"--stream gives every process its own shards: {len(urls)} shards cannot be split "
                            f"over {part.count} processes")

    def __len__(self) -> int:
        """Samples this process trains on in the epoch."""
        samples = self.key_index.size
        return samples if self.part.count == 1 else -(-samples // self.part.count)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int, dict[str, torch.Tensor]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if worker >= self.streams:
            return
        urls = self.urls[self.part.index::self.part.count][worker::self.streams]
        rows = StoreRows(CacheReader(self.cache), self.view, self.names)
        samples = (self._with_targets(url, key, label, encoded, rows) for url, key, label, encoded in
                   self._read(urls))
        if self.part.count > 1:
            share = len(self)
            samples = islice(samples, share // self.streams + (worker < share % self.streams))
        rng = random.Random(seeded_generator(self.seed, self.epoch, SHUFFLE, self.part.index, worker).initial_seed())
        for name, label, row, encoded, params, targets in webdataset.filters.shuffle(
                self.buffer, self.buffer, rng=rng)(samples):
            view = self.policy.replay(decode_image(encoded, name), params)
            yield view, label, row, {array: torch.from_numpy(values.astype(np.float32))
                                     for array, values in targets.items()}

    def _read(self, urls: list[str]) -> Iterator[tuple[str, str, int, bytes]]:
        """(shard, key, class id, encoded image) of every sample of `urls`, once, or round and round when
        several processes each take a fixed share."""
        while True:
            streamed = 0
            for url in urls:
                for key, label, encoded in stream_shard(url, self.num_classes):
                    streamed += 1
                    yield url, key, label, encoded
            if self.part.count == 1:
                return
            if streamed == 0:
                raise UserError(f"the shards {', '.join(urls)} hold no samples")

    def _with_targets(self, url: str, key: str, label: int, encoded: bytes, rows: StoreRows) -> tuple:
        row = int(self.key_index.rows([key])[0])
        stored = rows.row(row) if row >= 0 else None
        if stored is None or str(stored["keys"]) != key:
            raise UserError(f"sample '{key}' in {url} is not in the cache {self.cache}: it was precomputed from "
                            "other samples")
        if int(stored["labels"]) != label:
            raise UserError(f"sample '{key}' in {url} has class {label}, the cache {self.cache} class "
                            f"{int(stored['labels'])}: it was precomputed from other data")
        targets = {name: stored[name] for name in self.names}
        return f"{key} in {url}", label, row, encoded, stored[VIEW_PARAMS], targets

    def check_epoch(self, seen: int) -> None:
        """One process streams every sample once: as many as the store holds, or the shards are others."""
        if self.part.count == 1 and seen != self.key_index.size:
            raise UserError(f"the shards streamed {seen} samples and the cache {self.cache} holds "
                            f"{self.key_index.size}: it was precomputed from other shards")
