"""Creating a cache store, or continuing an unfinished one, and writing it block by block."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem

from richkd.cache.reader import first_difference, is_cache, open_existing_group, require_schema, store_location
from richkd.cache.schema import (
    DONE,
    FORMAT,
    IDENTITY_SECTIONS,
    SCHEMA_VERSION,
    Layout,
    create_array,
    describe_blocks,
    read_done_flags,
)
from richkd.pipeline.errors import UserError, out_of_space_is_a_user_error
from richkd.pipeline.runtime import console

# What a user is told when the disk fills up while a store is written.
FULL_DISK_ADVICE = "the blocks already written are kept, and running the same command again finishes the rest"


class CacheWriter:
    """Writes (view, shard) blocks; a block counts as written only once its `progress/done` flag is set."""

    def __init__(self, url: str, group: zarr.Group, layout: Layout):
        self.url, self.group, self.layout = url, group, layout
        with self.full_disk_is_a_user_error():
            for name, spec in layout.arrays().items():
                # Not `name in group`, which parses the metadata: zarr fails with a traceback on some altered ones,
                # which require_schema names.
                with contextlib.suppress(zarr.errors.ContainsArrayError):  # made before, or by another process
                    create_array(group, name, spec)
        require_schema(url, layout)
        self.arrays = {name: group[name] for name in layout.arrays()}

    @classmethod
    def open(cls, url: str, layout: Layout, provenance: dict, overwrite: bool = False) -> CacheWriter:
        """A new store at `url`, or the existing one when it was made with the same configuration.

        `provenance` holds the identity sections (which must match to continue a store) and any
        other root attributes. Anything at `url` that is not a richkd store is never replaced.
        """
        group = open_existing_group(url, mode="r+")
        if group is not None:
            if not is_cache(group):
                raise UserError(f"{url} exists but is not a richkd cache store; refusing to replace it")
            if not overwrite:
                stored = {section: group.attrs.get(section) for section in IDENTITY_SECTIONS}
                wanted = {section: provenance[section] for section in IDENTITY_SECTIONS}
                if "image_size" not in (stored["dataset"] or {}):  # made before stores recorded it: continued as is
                    wanted["dataset"] = {key: value for key, value in wanted["dataset"].items() if key != "image_size"}
                difference = first_difference(stored, wanted)
                if difference:
                    raise UserError(
                        f"cache {url} was made with another configuration ({difference}); "
                        "pass --overwrite to replace it or choose another --out"
                    )
                return cls(url, group, layout)
        attributes = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **provenance}
        with out_of_space_is_a_user_error(url, FULL_DISK_ADVICE):
            if group is not None:  # --overwrite, which one process alone may use
                group = zarr.create_group(store_location(url), overwrite=True, attributes=attributes)
            else:
                group = create_store(url, attributes)
        if group is None:  # another process of a parallel run made it meanwhile
            return cls.open(url, layout, provenance)
        return cls(url, group, layout)

    def full_disk_is_a_user_error(self):
        return out_of_space_is_a_user_error(self.url, FULL_DISK_ADVICE)

    def done(self) -> np.ndarray:
        """Which blocks are fully written; a block whose progress flag is damaged counts as not written, so it
        is computed again and its flag rewritten."""
        done, damaged = read_done_flags(self.arrays[DONE])
        if damaged:
            console.print(f"{self.url}: the progress flags of {len(damaged)} blocks are damaged "
                          f"({describe_blocks(damaged)}): computing those blocks again", soft_wrap=True)
        return done

    def write_static(self, arrays: dict[str, np.ndarray]) -> None:
        """The arrays that do not depend on the view (labels, keys, class and prompt embeddings)."""
        with self.full_disk_is_a_user_error():
            for name, values in arrays.items():
                self.arrays[name][...] = values

    def write_block(self, view: int, shard: int, outputs: dict[str, np.ndarray]) -> None:
        """All per-view arrays of one block, then its done flag."""
        start, stop = self.layout.shard_range(shard)
        with self.full_disk_is_a_user_error():
            for name in self.layout.per_view_arrays():
                self.arrays[name][view, start:stop] = outputs[name]
            self.arrays[DONE][view, shard] = True


def create_store(url: str, attributes: dict) -> zarr.Group | None:
    """A new store's group at `url`, its attributes in its metadata, or None when another process made one there
    first. On a local disk zarr makes a store's folder before it writes its metadata, and a process opening it in
    between would find a folder that is not a store: the group is made in a folder beside and renamed into place,
    which also lets only one of two processes make it. Elsewhere (object stores, memory) the metadata is the store's
    first object."""
    location = store_location(url)
    filesystem, path = fsspec.core.url_to_fs(location)
    if not isinstance(filesystem, LocalFileSystem):
        try:
            return zarr.create_group(location, attributes=attributes)
        except zarr.errors.ContainsGroupError:
            return None
    target = Path(path)
    building = target.with_name(f".{target.name}.{uuid.uuid4().hex}")  # beside it: the rename moves no data
    try:
        zarr.create_group(str(building), attributes=attributes)
        os.rename(building, target)
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # renaming onto a store made meanwhile
            raise
        return None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return zarr.open_group(location, mode="r+")
