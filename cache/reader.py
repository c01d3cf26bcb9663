"""Opening a cache store read-only and checking it before anything trusts its numbers."""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import zarr

from richkd.cache.schema import DONE, FORMAT, SCHEMA_VERSION, Layout
from richkd.pipeline.errors import UserError


def location_exists(url: str) -> bool:
    filesystem, path = fsspec.core.url_to_fs(url)
    return filesystem.exists(path)


def open_existing_group(url: str, mode: str = "r") -> zarr.Group | None:
    """The Zarr group at `url`, or None when nothing at all is stored there."""
    try:
        return zarr.open_group(url, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError) as error:
        if not location_exists(url):
            return None
        raise UserError(f"{url} exists but is not a richkd cache store") from error


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
        def short(value: Any) -> str:
            text = repr(value)
            return text if len(text) <= 60 else text[:57] + "..."
        return f"{path}: {short(stored)} in the store, {short(wanted)} now"
    return None


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
        if version != SCHEMA_VERSION:
            raise UserError(f"cache {self.url} has schema version {version}; this richkd reads version {SCHEMA_VERSION}")
        self.group = group
        self.attrs: dict = group.attrs.asdict()
        self.layout = Layout(**self.attrs["layout"])

    def array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except KeyError as error:
            raise UserError(f"cache {self.url} has no array '{name}'") from error

    def done(self) -> np.ndarray:
        """(V, number of shards) bool: which blocks are fully written."""
        return self.array(DONE)[...]

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def require_complete(self) -> None:
        done = self.done()
        if not done.all():
            raise UserError(
                f"cache {self.url} is incomplete: {int((~done).sum())} of {done.size} blocks are not written; "
                "re-run the same `richkd precompute` command to finish it"
            )

    def check_dataset(self, dataset) -> None:
        """Refuse a store built from another dataset, split or class list than `dataset`."""
        stored = self.attrs["dataset"]
        wanted = dataset.describe()
        for field in ("name", "split", "num_samples", "class_names", "fingerprint"):
            if stored[field] != wanted[field]:
                difference = first_difference(stored[field], wanted[field], f"dataset.{field}")
                raise UserError(f"cache {self.url} was built for another dataset ({difference})")
