"""The cache store's schema: the contract between `richkd precompute` and everything that reads its output.

A Zarr v3 group. V views, N samples, C classes, P prompt templates, k view parameters.
Per-sample arrays are chunked along N and sharded so that one shard holds one write unit
(`shard_size` samples of one view): writers of different (view, shard) blocks never touch the
same file, and `progress/done[view, shard]` records which blocks are fully written.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

FORMAT = "richkd-cache"
SCHEMA_VERSION = 1

# Arrays written block by block, shape (V, N, ...): row i is dataset index i.
PER_VIEW_ARRAYS = ("views/params", "teacher/logits", "teacher/features", "clip/image_embeds", "clip/logits")
# What a store written with --topk K holds in place of each dense logit array: the K largest values then the rest
# (width K + 1), and their class ids (width K); `richkd.pipeline.topk` says how the other classes are rebuilt.
TOPK_ARRAYS = {"teacher/logits": ("teacher/topk_logits", "teacher/topk_classes"),
               "clip/logits": ("clip/topk_logits", "clip/topk_classes")}
# Arrays written once, when the store is created.
STATIC_ARRAYS = ("labels", "keys", "clip/class_embeds", "clip/prompt_embeds")
DONE = "progress/done"

PRECISIONS = ("float16", "float32")

# Provenance sections that must agree for a run to continue an existing store.
IDENTITY_SECTIONS = ("layout", "dataset", "views", "teacher", "clip")


def stored_arrays(names: tuple[str, ...], topk: int) -> tuple[str, ...]:
    """The arrays that hold the per-view arrays `names` in a store of `topk` (a logit array's top-k pair if > 0)."""
    return tuple(stored for name in names
                 for stored in (TOPK_ARRAYS[name] if topk and name in TOPK_ARRAYS else (name,)))


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None


@dataclass(frozen=True)
class Layout:
    """Every dimension of a store, and how it is cut into chunks and shards."""

    views: int
    samples: int
    classes: int
    teacher_dim: int
    clip_dim: int
    prompts: int
    view_params: int
    shard_size: int
    chunk_size: int
    precision: str
    topk: int = 0  # 0: dense logits
    topk_temperature: float = 1.0

    @property
    def num_shards(self) -> int:
        return -(-self.samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.samples)

    def blocks(self) -> list[tuple[int, int]]:
        """Every (view, shard) write unit, view-major."""
        return [(view, shard) for view in range(self.views) for shard in range(self.num_shards)]

    def per_view_arrays(self) -> tuple[str, ...]:
        return stored_arrays(PER_VIEW_ARRAYS, self.topk)

    def arrays(self) -> dict[str, ArraySpec]:
        V, N, C = self.views, self.samples, self.classes
        chunk, shard = min(self.chunk_size, self.shard_size), self.shard_size

        def per_view(width: int, dtype: str) -> ArraySpec:
            return ArraySpec((V, N, width), dtype, (1, chunk, width), (1, shard, width))

        def per_sample(dtype: str) -> ArraySpec:
            return ArraySpec((N,), dtype, (chunk,), (shard,))

        class_chunk = min(C, 128)
        if self.topk:
            class_ids = "int16" if C <= np.iinfo(np.int16).max else "int32"
            logits = {array: spec for values, classes in TOPK_ARRAYS.values() for array, spec in
                      ((values, per_view(self.topk + 1, self.precision)), (classes, per_view(self.topk, class_ids)))}
        else:
            logits = {name: per_view(C, self.precision) for name in TOPK_ARRAYS}
        return {
            "labels": per_sample("int64"),
            "keys": per_sample("str"),
            "views/params": per_view(self.view_params, "int32"),
            "teacher/features": per_view(self.teacher_dim, self.precision),
            "clip/image_embeds": per_view(self.clip_dim, self.precision),
            **logits,
            "clip/class_embeds": ArraySpec((C, self.clip_dim), "float32", (class_chunk, self.clip_dim), None),
            "clip/prompt_embeds": ArraySpec(
                (C, self.prompts, self.clip_dim), "float32", (class_chunk, self.prompts, self.clip_dim), None),
            # One chunk per flag: concurrent writers of different blocks never rewrite each other's flags.
            DONE: ArraySpec((V, self.num_shards), "bool", (1, 1), None),
        }

    def describe(self) -> dict:
        described = asdict(self)
        if not self.topk:  # as dense stores were recorded before top-k existed, so that they can still be continued
            del described["topk"], described["topk_temperature"]
        return described


# What a read returns where no chunk was written (or a shard file is truncated): never a value richkd writes,
# so that a damaged store is detected on read instead of yielding zeros. Done flags read as not done.
MISSING = {"float16": np.nan, "float32": np.nan, "int16": np.iinfo(np.int16).min, "int32": np.iinfo(np.int32).min,
           "int64": -1, "str": "", "bool": False}


def read_done_flags(array: zarr.Array) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """`progress/done`, and the (view, shard) flags whose chunk fails its checksum (read as not done)."""
    try:
        return array[...], []
    except (ValueError, RuntimeError):  # a checksum or decompression failure: find the flags it hides
        pass
    done, damaged = np.zeros(array.shape, dtype=bool), []
    for view, shard in np.ndindex(*array.shape):
        try:
            done[view, shard] = array[view, shard]
        except (ValueError, RuntimeError):
            damaged.append((view, shard))
    return done, damaged


def describe_blocks(blocks: list[tuple[int, int]], limit: int = 3) -> str:
    """`view 0 shard 3, view 1 shard 0, ...`"""
    named = ", ".join(f"view {view} shard {shard}" for view, shard in blocks[:limit])
    return named + (", ..." if len(blocks) > limit else "")


def has_missing(values: np.ndarray) -> bool:
    """Whether `values` holds the fill value of its dtype, i.e. came from a chunk that is not there."""
    if values.dtype.kind == "f":
        return bool(np.isnan(values).any())
    if values.dtype.kind == "b":
        return False
    return bool((values == MISSING[str(values.dtype) if values.dtype.kind != "T" else "str"]).any())


def compressors(dtype: str) -> list:
    """Blosc zstd, then a CRC32C checksum of every compressed chunk, so corruption is detected on read."""
    if dtype == "str":
        return [BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle"), Crc32cCodec()]
    return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=np.dtype(dtype).itemsize), Crc32cCodec()]


def create_array(group: zarr.Group, name: str, spec: ArraySpec) -> zarr.Array:
    return group.create_array(
        name,
        shape=spec.shape,
        dtype=str if spec.dtype == "str" else spec.dtype,
        chunks=spec.chunks,
        shards=spec.shards,
        compressors=compressors(spec.dtype),
        fill_value=MISSING[spec.dtype],
    )


@functools.cache
def array_metadata(spec: ArraySpec) -> dict:
    """The metadata (zarr.json, as JSON) that `create_array` writes for `spec`, its attributes aside: what a store's
    array must hold, as zarr writes it."""
    array = create_array(zarr.open_group(zarr.storage.MemoryStore(), mode="w"), "array", spec)
    metadata = json.loads(json.dumps(array.metadata.to_dict()))
    del metadata["attributes"]
    return metadata


def metadata_difference(stored: object, expected: object, field: str = "") -> tuple[str, object, object] | None:
    """The first field where `stored` metadata departs from `expected`, as (dotted field, stored, expected), or None;
    fields `expected` lacks are ignored. Lists of objects (codecs) are compared item by item."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        items = [(key, stored.get(key), value) for key, value in expected.items()]
    elif (isinstance(stored, list) and isinstance(expected, list) and len(stored) == len(expected)
          and all(isinstance(value, dict) for value in expected)):
        items = [(str(index), *pair) for index, pair in enumerate(zip(stored, expected))]
    else:
        return None if stored == expected else (field or "metadata", stored, expected)
    for key, stored_value, expected_value in items:
        difference = metadata_difference(stored_value, expected_value, f"{field}.{key}" if field else key)
        if difference:
            return difference
    return None
