"""Opening a cache store read-only and checking it before anything trusts its numbers."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from typing import Any

import fsspec
import numpy as np
import torch
import zarr

from richkd.cache.schema import (
    DONE,
    FORMAT,
    READABLE_SCHEMA_VERSIONS,
    ArraySpec,
    Layout,
    Source,
    array_metadata,
    describe_blocks,
    has_missing,
    metadata_difference,
    read_done_flags,
    schema_one_sources,
    store_arrays,
    stored_arrays,
)
from richkd.pipeline.errors import UserError
from richkd.pipeline.topk import SparseLogits


def store_location(url: str) -> str:
    """Where zarr should open `url`: a plain path for file:// URLs, so that they get zarr's local store,
    whose writes are atomic; any other fsspec URL (s3://, gs://, memory://, ...) as it is."""
    return url.removeprefix("file://") if url.startswith("file://") else url


def location_exists(url: str) -> bool:
    filesystem, path = fsspec.core.url_to_fs(url)
    return filesystem.exists(path)


def open_existing_group(url: str, mode: str = "r") -> zarr.Group | None:
    """The Zarr group at `url`, or None when nothing at all is stored there."""
    try:
        return zarr.open_group(store_location(url), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError) as error:
        if not location_exists(url):
            return None
        raise UserError(f"{url} exists but is not a richkd cache store") from error
    except json.JSONDecodeError as error:
        raise UserError(f"{url}: its zarr.json is damaged (not valid JSON: {error}); delete the store and run "
                        "`richkd precompute` again") from error


def is_cache(group: zarr.Group) -> bool:
    return group.attrs.get("format") == FORMAT


def first_difference(stored: Any, wanted: Any, path: str = "") -> str | None:
    """Where two provenance records first differ, as `a.b: stored != wanted`, or None when equal."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        for key in sorted(set(stored) | set(wanted)):
            difference = first_difference(stored.get(key), wanted.get(key), f"{path}.{key}" if path else key)
            if difference:
                return difference
        return None
    if stored != wanted:
        return f"{path}: {shortened(repr(stored))} in the store, {shortened(repr(wanted))} now"
    return None


def shortened(text: str) -> str:
    """`text`, cut to 60 characters for a one-line message; a quoted text is cut inside its quotes, so that they
    stay paired (a sha256 is 64 characters)."""
    if len(text) <= 60:
        return text
    if text[0] in "'\"" and text[-1] == text[0]:
        return text[:55] + "..." + text[-1]
    return text[:57] + "..."


def require_schema(url: str, arrays: dict[str, ArraySpec]) -> None:
    """Refuse a store whose arrays' metadata is not `arrays` (`store_arrays`), what precompute writes: another data
    type, shape, chunking or codec would misread their bytes, and another fill value would let a missing chunk pass
    as numbers. Each zarr.json is read as JSON before zarr parses it, which fails with a traceback on some (a fill
    value that does not fit the data type)."""
    filesystem, root = fsspec.core.url_to_fs(store_location(url))
    for name, spec in arrays.items():
        file = f"{name}/zarr.json"
        try:
            stored = json.loads(filesystem.cat_file(f"{root}/{file}"))
        except FileNotFoundError as error:
            raise UserError(f"cache {url} has no array '{name}'") from error
        except ValueError as error:  # not JSON, or not text
            raise UserError(f"cache {url}: the metadata of {name} ({file}) is damaged (not valid JSON: {error}); "
                            "delete the store and run `richkd precompute` again") from error
        difference = metadata_difference(stored, array_metadata(spec))
        if difference:
            field, found, expected = difference
            raise UserError(f"cache {url}: array {name} has {field} {compact_json(found)} where the store's layout "
                            f"says {compact_json(expected)} ({file}): the store was altered; delete it and run "
                            "`richkd precompute` again")


class CacheReader:
    """A store opened read-only: its provenance, layout, completeness and arrays."""

    def __init__(self, url: str):
        self.url = str(url)
        group = open_existing_group(self.url)
        if group is None:
            raise UserError(f"no cache store at {self.url}")
        if not is_cache(group):
            raise UserError(f"{self.url} is not a richkd cache store (no '{FORMAT}' format attribute)")
        version = group.attrs.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise UserError(f"cache {self.url} has schema version {version}; "
                            f"this richkd reads versions {' and '.join(map(str, READABLE_SCHEMA_VERSIONS))}")
        self.group = group
        self.attrs: dict = group.attrs.asdict()
        self.layout = Layout.from_record(self.attrs["layout"])
        self.sources, self.source_records = store_sources(self.attrs)
        self.specs = store_arrays(self.layout, tuple(self.sources.values()))  # every array it holds
        require_schema(self.url, self.specs)
        self.filesystem, self.root = fsspec.core.url_to_fs(store_location(self.url))

    def source(self, name: str) -> Source:
        if name not in self.sources:
            raise UserError(f"cache {self.url} has no source '{name}'; it holds {', '.join(self.sources)}")
        return self.sources[name]

    @property
    def teacher_input_transform(self) -> dict:
        """The normalisation the store's teacher (its first classifier) was fed: students are fed the same unless
        told otherwise."""
        return self.source_records[self.sources_of_kind("classifier")[0]]["input_transform"]

    def provenance(self) -> dict:
        """The store's dataset, views, sources and layout records, as a run records where its targets came from."""
        return {"dataset": self.attrs["dataset"], "views": self.attrs["views"], "sources": self.source_records,
                "layout": self.attrs["layout"]}

    def sources_of_kind(self, kind: str) -> list[str]:
        return [name for name, source in self.sources.items() if source.kind == kind]

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def missing_file(self, name: str, start: int, view: int | None = None) -> str | None:
        """The file (shard, or chunk of an unsharded array) holding row `start` of array `name` (of `view`), when it
        does not exist; zarr would read the fill value in its place."""
        array = self.array(name)
        origin = (start,) if view is None else (view, start)
        origin += (0,) * (array.ndim - len(origin))
        coordinates = tuple(index // size for index, size in zip(origin, array.shards or array.chunks))
        file = f"{name}/{array.metadata.encode_chunk_key(coordinates)}"
        return None if self.filesystem.exists(f"{self.root}/{file}") else file

    def read(self, name: str, start: int, stop: int, view: int | None = None) -> np.ndarray:
        """Rows start:stop of an array (of one view for per-view arrays), refusing damaged or missing data.

        Every chunk carries a CRC32C checksum, and a chunk that is not there (or a truncated shard file)
        reads as a fill value richkd never writes, so neither can pass as numbers.
        """
        array = self.array(name)
        where = block_name(name, start, stop, view)
        try:
            values = array[start:stop] if view is None else array[view, start:stop]
        except (ValueError, RuntimeError) as error:  # checksum or decompression failure
            raise UserError(f"cache {self.url}: {where} is damaged ({error}); "
                            f"`richkd inspect --verify {self.url}` lists every damaged block") from error
        if has_missing(values):
            raise UserError(f"cache {self.url}: {where} is missing or truncated; "
                            f"`richkd inspect --verify {self.url}` lists every damaged block")
        return values

    def dense_logits(self, source: str, start: int, stop: int, view: int) -> torch.Tensor:
        """Rows start:stop of source `source`'s logits as float32, rebuilt from a top-k store's arrays."""
        stored = [as_tensor(self.read(array, start, stop, view))
                  for array in stored_arrays((self.source(source).logits,), self.layout.topk)]
        if len(stored) == 1:
            return stored[0]
        return SparseLogits.from_stored(*stored, self.layout.classes).dense()

    def done(self, sources: tuple[str, ...] | None = None) -> np.ndarray:
        """(V, number of shards) bool: which blocks are fully written, the views' parameters and the outputs of
        `sources` (default: every source); damaged progress flags are an error."""
        names = self.sources if sources is None else sources
        flags = dict.fromkeys([DONE, *(self.source(name).done_flags for name in names)])
        done = np.ones((self.layout.views, self.layout.num_shards), dtype=bool)
        for array in flags:
            written, damaged = read_done_flags(self.array(array))
            if damaged:
                raise UserError(f"cache {self.url}: the progress flags of {len(damaged)} blocks are damaged "
                                f"({describe_blocks(damaged)}); the same `richkd precompute` command computes those "
                                "blocks again")
            done &= written
        return done

    def require_complete(self, sources: tuple[str, ...] | None = None) -> None:
        """Refuse a store whose views, or the outputs of `sources` (default: every source), are not all written."""
        done = self.done(sources)
        if not done.all():
            raise UserError(
                f"cache {self.url} is incomplete: {int((~done).sum())} of {done.size} blocks are not written; "
                "re-run the same `richkd precompute` command to finish it"
            )

    def fits_in_memory(self, names: tuple[str, ...], memory_budget: int) -> bool:
        """Whether one view of the arrays `names` fits `memory_budget` bytes."""
        return view_nbytes(self.layout, {name: self.array(name) for name in names}, names) <= memory_budget

    def open_view(self, view: int, names: tuple[str, ...], order: np.ndarray,
                  in_memory: bool) -> InMemoryView | StreamedView:
        """View `view` of the per-view arrays `names`, whole in memory or streamed in `order`."""
        if in_memory:
            shards = np.unique(order // self.layout.shard_size).tolist()
            if len(shards) == self.layout.num_shards:
                return InMemoryView({name: self.read(name, 0, self.layout.samples, view) for name in names})
            # One process's shards of several: only their rows are read, and only their pages are ever touched.
            arrays = {name: np.empty((self.layout.samples, self.array(name).shape[-1]), self.array(name).dtype)
                      for name in names}
            for shard in shards:
                start, stop = self.layout.shard_range(shard)
                for name in names:
                    arrays[name][start:stop] = self.read(name, start, stop, view)
            return InMemoryView(arrays)
        return StreamedView(self, names, view, order)

    def rows_of(self, dataset) -> np.ndarray | None:
        """The store row of each sample of `dataset`, matched by key (None: the store's own order).

        The samples may come in another order or format (e.g. the same CIFAR split packed into tar shards):
        each key must be in the store with the same label. A store of another split, class list or set of
        samples is refused.
        """
        wanted = dataset.describe()
        self.require_dataset(**{field: wanted[field] for field in ("split", "num_samples", "class_names")})
        self.require_image_size(dataset)
        if self.attrs["dataset"]["fingerprint"] == wanted["fingerprint"]:
            return None
        rows = self._match_keys(dataset)
        if rows is None:
            self.require_dataset(fingerprint=wanted["fingerprint"])
        return rows

    def require_dataset(self, **wanted) -> None:
        """Refuse the store unless its dataset record holds these values."""
        for field, value in wanted.items():
            difference = first_difference(self.attrs["dataset"][field], value, f"dataset.{field}")
            if difference:
                raise UserError(f"cache {self.url} was built for another dataset ({difference})")

    def require_image_size(self, dataset) -> None:
        """Refuse a dataset whose images have another side than those the stored views were cut from: the same keys
        and labels at another size would replay every stored crop at another place and scale. A store written before
        stores recorded the side is not checked."""
        recorded = self.attrs["dataset"]
        if "image_size" not in recorded or recorded["image_size"] == dataset.native_size:
            return
        raise UserError(f"cache {self.url} was precomputed from {images_of_side(recorded['image_size'])}, and the "
                        f"{dataset.split} split given has {images_of_side(dataset.native_size)}: its stored views "
                        "would be cut from other pixels; give it the images it was precomputed from, or precompute "
                        "again from these")

    def _match_keys(self, dataset) -> np.ndarray | None:
        stored_keys = self.read("keys", 0, self.layout.samples).tolist()
        rows = KeyIndex(stored_keys).rows(dataset.keys)
        if (rows < 0).any() or [stored_keys[row] for row in rows] != list(dataset.keys):
            return None
        if not np.array_equal(self.read("labels", 0, self.layout.samples)[rows], dataset.labels):
            return None
        return rows

    def key_index(self) -> KeyIndex:
        return KeyIndex(self.read("keys", 0, self.layout.samples).tolist())


def store_sources(attrs: dict) -> tuple[dict[str, Source], dict[str, dict]]:
    """A store's sources by name, in the order they were written, and each one's provenance record."""
    if attrs["schema_version"] == 1:
        return schema_one_sources(attrs["layout"]), {"teacher": attrs["teacher"], "clip": attrs["clip"]}
    records = attrs["sources"]
    return {name: Source.from_record(name, record) for name, record in records.items()}, records


def block_name(name: str, start: int, stop: int, view: int | None) -> str:
    """`teacher/logits view 1 rows 16-31`"""
    return f"{name}{f' view {view}' if view is not None else ''} rows {start}-{stop - 1}"


def compact_json(value: Any) -> str:
    return shortened(json.dumps(value, separators=(",", ":")))


def images_of_side(side: int | None) -> str:
    return f"{side} x {side} images" if side is not None else "images of several sizes (or not square)"


class KeyIndex:
    """Sample key -> store row, as two arrays of 16 bytes a sample (a dict of a million keys would take
    some 150 MB in every loader process). Keys are looked up by a 64-bit hash: a caller that must be sure
    compares the stored key."""

    def __init__(self, keys: list[str]):
        self.size = len(keys)
        hashes = key_hashes(keys)
        self.rows_by_hash = np.argsort(hashes, kind="stable")
        self.sorted_hashes = hashes[self.rows_by_hash]

    def rows(self, keys: list[str]) -> np.ndarray:
        """The row of each key, -1 for a key not in the store."""
        hashes = key_hashes(keys)
        found = np.minimum(np.searchsorted(self.sorted_hashes, hashes), len(self.sorted_hashes) - 1)
        return np.where(self.sorted_hashes[found] == hashes, self.rows_by_hash[found], -1)


def key_hashes(keys: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
                     for key in keys], dtype=np.uint64)


def as_tensor(values: np.ndarray) -> torch.Tensor:
    """Stored values as training reads them: numbers as float32, class ids as int64."""
    return torch.from_numpy(values.astype(np.float32 if values.dtype.kind == "f" else np.int64))


def view_nbytes(layout: Layout, arrays: dict, names: tuple[str, ...]) -> int:
    """Bytes of one view of the per-view arrays `names`, decompressed."""
    return sum(layout.samples * arrays[name].shape[-1] * arrays[name].dtype.itemsize for name in names)


def block_shuffled_order(layout: Layout, generator: torch.Generator) -> np.ndarray:
    """Every index once: shards in random order, rows in random order within each shard.

    Reading the store in this order touches one shard file at a time, front to back.
    """
    order = []
    for shard in torch.randperm(layout.num_shards, generator=generator).tolist():
        start, stop = layout.shard_range(shard)
        order.append(start + torch.randperm(stop - start, generator=generator).numpy())
    return np.concatenate(order)


def shard_share(order: np.ndarray, layout: Layout, part) -> np.ndarray:
    """Process `part`'s share of `order`: the rows of shards `part.index`, `part.index + part.count`, ..., in
    `order`'s order, so that a process reads only its own shards, the same ones every epoch; wrapped around
    so that every share is as long."""
    if part.count == 1:
        return order
    if layout.num_shards < part.count:
        raise UserError(f"the cache has {layout.num_shards} shards, fewer than the {part.count} processes: "
                        "precompute it with a smaller --shard-size")
    owner = (order // layout.shard_size) % part.count
    length = max(np.bincount(owner, minlength=part.count))
    return np.resize(order[owner == part.index], length)


class InMemoryView:
    """One view's arrays, read whole into memory."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def gather(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return {name: as_tensor(values[indices]) for name, values in self.arrays.items()}

    def close(self) -> None:
        self.arrays = {}


class StreamedView:
    """One view's arrays, read shard by shard in the epoch's order by a background thread.

    At most `prefetch` shards wait in the queue and two are held for gathering, so memory stays
    bounded whatever the store's size.
    """

    def __init__(self, reader: CacheReader, names: tuple[str, ...], view: int, order: np.ndarray,
                 prefetch: int = 2):
        self.layout = layout = reader.layout
        shard_of = order // layout.shard_size
        keep = np.ones(len(order), dtype=bool)
        keep[1:] = shard_of[1:] != shard_of[:-1]
        self.shard_sequence = shard_of[keep].tolist()
        self.position = {shard: position for position, shard in enumerate(self.shard_sequence)}
        self.loaded: dict[int, dict[str, np.ndarray]] = {}
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(reader, names, view), daemon=True)
        self.thread.start()

    def _read(self, reader: CacheReader, names: tuple[str, ...], view: int) -> None:
        for shard in self.shard_sequence:
            start, stop = self.layout.shard_range(shard)
            try:
                block = {name: reader.read(name, start, stop, view) for name in names}
            except Exception as error:  # handed to the consumer, which raises it
                block = error
            while not self.stop.is_set():
                try:
                    self.queue.put((shard, block), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self.stop.is_set() or isinstance(block, Exception):
                return

    def gather(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        shards = indices // self.layout.shard_size
        needed = set(np.unique(shards).tolist())
        while not needed <= self.loaded.keys():
            shard, block = self.queue.get()
            if isinstance(block, Exception):
                raise block
            self.loaded[shard] = block
        oldest = min(self.position[shard] for shard in needed)
        for shard in [s for s in self.loaded if self.position[s] < oldest]:
            del self.loaded[shard]
        rows = indices - shards * self.layout.shard_size
        gathered = {}
        for name in next(iter(self.loaded.values())):
            first = self.loaded[shards[0]][name]
            parts = np.empty((len(indices), first.shape[-1]), dtype=first.dtype)
            for shard in needed:
                mask = shards == shard
                parts[mask] = self.loaded[shard][name][rows[mask]]
            gathered[name] = as_tensor(parts)
        return gathered

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.loaded = {}
