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
SCHEMA_VERSION = 2
# Schema 1 (richkd before named sources) held exactly a `teacher` and a `clip`, both flagged in `progress/done`, their
# dimensions in the layout: it is read as those two sources.
READABLE_SCHEMA_VERSIONS = (1, 2)

# Arrays every store holds beside its sources; `progress/done` flags the views' parameters (in schema 1, everything).
PER_SAMPLE_ARRAYS = ("labels", "keys")
VIEW_PARAMS = "views/params"
DONE = "progress/done"

PRECISIONS = ("float16", "float32")

# Provenance sections that must agree for a run to continue an existing store (each written source's record, too).
IDENTITY_SECTIONS = ("layout", "dataset", "views")


def topk_arrays(logits: str) -> tuple[str, str]:
    """What a store written with --topk K holds in place of the dense logit array `logits` (`<source>/logits`): the K
    largest values then the rest (width K + 1), and their class ids (width K); `richkd.pipeline.topk` says how the
    other classes are rebuilt."""
    source = logits.rpartition("/")[0]
    return f"{source}/topk_logits", f"{source}/topk_classes"


def stored_arrays(names: tuple[str, ...], topk: int) -> tuple[str, ...]:
    """The arrays that hold the per-view arrays `names` in a store of `topk` (a logit array's top-k pair if > 0)."""
    return tuple(stored for name in names
                 for stored in (topk_arrays(name) if topk and name.endswith("/logits") else (name,)))


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None


@dataclass(frozen=True)
class Layout:
    """Every dimension a store's sources share, and how per-sample arrays are cut into chunks and shards."""

    views: int
    samples: int
    classes: int
    view_params: int
    shard_size: int
    chunk_size: int
    precision: str
    topk: int = 0  # 0: dense logits
    topk_temperature: float = 1.0

    @classmethod
    def from_record(cls, record: dict) -> Layout:
        """The layout a store records (schema 1 also recorded its two sources' sizes there)."""
        return cls(**{key: value for key, value in record.items() if key not in ("teacher_dim", "clip_dim", "prompts")})

    @property
    def num_shards(self) -> int:
        return -(-self.samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.samples)

    def blocks(self) -> list[tuple[int, int]]:
        """Every (view, shard) write unit, view-major."""
        return [(view, shard) for view in range(self.views) for shard in range(self.num_shards)]

    def per_view(self, width: int, dtype: str) -> ArraySpec:
        chunk, shard = min(self.chunk_size, self.shard_size), self.shard_size
        return ArraySpec((self.views, self.samples, width), dtype, (1, chunk, width), (1, shard, width))

    def flags(self) -> ArraySpec:
        """A (view, shard) done-flag array: one chunk per flag, so that concurrent writers of different blocks
        never rewrite each other's flags."""
        return ArraySpec((self.views, self.num_shards), "bool", (1, 1), None)

    def arrays(self) -> dict[str, ArraySpec]:
        """The arrays every store holds beside its sources."""
        chunk = min(self.chunk_size, self.shard_size)
        per_sample = {dtype: ArraySpec((self.samples,), dtype, (chunk,), (self.shard_size,))
                      for dtype in ("int64", "str")}
        return {"labels": per_sample["int64"], "keys": per_sample["str"],
                VIEW_PARAMS: self.per_view(self.view_params, "int32"), DONE: self.flags()}

    def describe(self) -> dict:
        described = asdict(self)
        if not self.topk:  # as dense stores were recorded before top-k existed
            del described["topk"], described["topk_temperature"]
        return described


@dataclass(frozen=True)
class Source:
    """One model whose outputs a store holds, under `<name>/`: its logits per view (a CLIP's: cosines with its class
    embeddings) and, with outputs `all`, its features (a classifier's pooled penultimate features, a CLIP's
    L2-normalised image embeddings), and a CLIP's class and prompt embeddings. `<name>/done` flags its blocks (a
    schema-1 store's two sources share `progress/done`)."""

    name: str
    kind: str  # classifier or clip
    dim: int  # features' (embeddings') size
    prompts: int = 0  # a CLIP's prompt templates
    outputs: str = "all"  # all: logits and features; logits: logits alone
    done: str = ""  # its flags' array, when not `<name>/done`

    FIELDS = ("kind", "dim", "prompts", "outputs")

    @classmethod
    def from_record(cls, name: str, record: dict) -> Source:
        return cls(name, **{field: record[field] for field in (*cls.FIELDS, "done") if field in record})

    def describe(self) -> dict:
        return {field: getattr(self, field) for field in self.FIELDS} | ({"done": self.done} if self.done else {})

    @property
    def logits(self) -> str:
        return f"{self.name}/logits"

    @property
    def features(self) -> str | None:
        """Its stored features' array, None in a logits-only store."""
        if self.outputs != "all":
            return None
        return f"{self.name}/{'image_embeds' if self.kind == 'clip' else 'features'}"

    @property
    def done_flags(self) -> str:
        return self.done or f"{self.name}/done"

    @property
    def class_embeds(self) -> str:
        return f"{self.name}/class_embeds"

    @property
    def prompt_embeds(self) -> str:
        return f"{self.name}/prompt_embeds"

    def per_view_arrays(self, topk: int) -> tuple[str, ...]:
        return stored_arrays((self.logits, *([self.features] if self.features else [])), topk)

    def arrays(self, layout: Layout) -> dict[str, ArraySpec]:
        C, precision = layout.classes, layout.precision
        if layout.topk:
            class_ids = "int16" if C <= np.iinfo(np.int16).max else "int32"
            values, classes = topk_arrays(self.logits)
            arrays = {values: layout.per_view(layout.topk + 1, precision),
                      classes: layout.per_view(layout.topk, class_ids)}
        else:
            arrays = {self.logits: layout.per_view(C, precision)}
        if self.features:
            arrays[self.features] = layout.per_view(self.dim, precision)
        if self.kind == "clip":
            class_chunk = min(C, 128)
            arrays[self.class_embeds] = ArraySpec((C, self.dim), "float32", (class_chunk, self.dim), None)
            arrays[self.prompt_embeds] = ArraySpec(
                (C, self.prompts, self.dim), "float32", (class_chunk, self.prompts, self.dim), None)
        arrays[self.done_flags] = layout.flags()
        return arrays


def store_arrays(layout: Layout, sources: tuple[Source, ...]) -> dict[str, ArraySpec]:
    """Every array of a store of `layout` holding `sources`."""
    arrays = layout.arrays()
    for source in sources:
        arrays.update(source.arrays(layout))
    return arrays


def schema_one_sources(record: dict) -> dict[str, Source]:
    """A schema-1 store's `teacher` and `clip`, from its layout record."""
    return {"teacher": Source("teacher", "classifier", record["teacher_dim"], done=DONE),
            "clip": Source("clip", "clip", record["clip_dim"], record["prompts"], done=DONE)}


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
