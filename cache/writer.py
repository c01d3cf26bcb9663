"""Creating a cache store, or continuing an unfinished one, and writing it block by block."""

from __future__ import annotations

import contextlib
import copy
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
    VIEW_PARAMS,
    Layout,
    Source,
    create_array,
    describe_blocks,
    read_done_flags,
    schema_one_sources,
)
from richkd.pipeline.errors import UserError, out_of_space_is_a_user_error
from richkd.pipeline.runtime import console

# What a user is told when the disk fills up while a store is written.
FULL_DISK_ADVICE = "the blocks already written are kept, and running the same command again finishes the rest"


class CacheWriter:
    """Writes (view, shard) blocks of `sources`, and of the views' parameters when `writes_views` (a new store); a
    block counts as written only once its flags are set. Arrays of the store's other sources are never written."""

    def __init__(self, url: str, group: zarr.Group, layout: Layout, sources: tuple[Source, ...], writes_views: bool):
        self.url, self.group, self.layout, self.sources = url, group, layout, sources
        specs = layout.arrays() if writes_views else {}
        for source in sources:
            specs.update(source.arrays(layout))
        with self.full_disk_is_a_user_error():
            for name, spec in specs.items():
                # Not `name in group`, which parses the metadata: zarr fails with a traceback on some altered ones,
                # which require_schema names.
                with contextlib.suppress(zarr.errors.ContainsArrayError):  # made before, or by another process
                    create_array(group, name, spec)
        require_schema(url, specs)
        self.arrays = {name: group[name] for name in specs}
        self.per_view_arrays = ((VIEW_PARAMS,) if writes_views else ()) + tuple(
            name for source in sources for name in source.per_view_arrays(layout.topk))
        # The views' flag last: a block whose sources are flagged but not its views is written again.
        self.flags = tuple(dict.fromkeys([source.done_flags for source in sources] + [DONE] * writes_views))

    @classmethod
    def open(cls, url: str, layout: Layout, provenance: dict, sources: tuple[Source, ...],
             overwrite: bool = False) -> CacheWriter:
        """A new store at `url` holding `sources`, or the existing one when it was made with the same configuration.

        `provenance` holds the identity sections (which must match to continue a store), the sources' records and
        any other root attributes. Anything at `url` that is not a richkd store is never replaced.
        """
        group = open_existing_group(url, mode="r+")
        if group is not None:
            if not is_cache(group):
                raise UserError(f"{url} exists but is not a richkd cache store; refusing to replace it")
            if not overwrite:
                attributes = group.attrs.asdict()
                if attributes.get("schema_version") != SCHEMA_VERSION:
                    raise UserError(f"cache {url} has schema version {attributes.get('schema_version')}, written by "
                                    "an earlier richkd: it is read as it is and --add-source adds sources to it, but "
                                    "it is not continued; pass --overwrite to write it again or choose another --out")
                missing = [source.name for source in sources if source.name not in attributes["sources"]]
                if missing:
                    raise UserError(f"cache {url} has no source {missing[0]}: add it to the finished store with "
                                    "--add-source")
                stored = {section: attributes.get(section) for section in IDENTITY_SECTIONS}
                difference = first_difference(stored, {section: provenance[section] for section in IDENTITY_SECTIONS})
                for source in sources:
                    difference = difference or source_difference(
                        source.name, attributes["sources"][source.name], provenance["sources"][source.name])
                if difference:
                    raise UserError(
                        f"cache {url} was made with another configuration ({difference}); "
                        "pass --overwrite to replace it or choose another --out"
                    )
                return cls(url, group, layout, sources, writes_views=True)
        attributes = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **provenance}
        with out_of_space_is_a_user_error(url, FULL_DISK_ADVICE):
            if group is not None:  # --overwrite, which one process alone may use
                group = zarr.create_group(store_location(url), overwrite=True, attributes=attributes)
            else:
                group = create_store(url, attributes)
        if group is None:  # another process of a parallel run made it meanwhile
            return cls.open(url, layout, provenance, sources)
        return cls(url, group, layout, sources, writes_views=True)

    @classmethod
    def add(cls, url: str, sources: tuple[Source, ...], records: dict[str, dict]) -> CacheWriter:
        """The finished store at `url`, `sources` (with provenance `records`) added to its sources, or continued when
        it holds them already with the same records. A schema-1 store is recorded as schema 2 first (its arrays stay
        as they are)."""
        group = store_to_add_to(url)
        stored_attributes = group.attrs.asdict()
        attributes = upgraded(copy.deepcopy(stored_attributes))
        for source in sources:
            stored = attributes["sources"].get(source.name)
            if stored is None:
                attributes["sources"][source.name] = records[source.name]
                continue
            difference = source_difference(source.name, stored, records[source.name])
            if difference:
                raise UserError(f"cache {url} holds a source {source.name} made otherwise ({difference}): give the "
                                "new one another name")
        if attributes != stored_attributes:
            with out_of_space_is_a_user_error(url, FULL_DISK_ADVICE):
                group.attrs.put(attributes)
        return cls(url, group, Layout.from_record(attributes["layout"]), sources, writes_views=False)

    def full_disk_is_a_user_error(self):
        return out_of_space_is_a_user_error(self.url, FULL_DISK_ADVICE)

    def done(self) -> np.ndarray:
        """Which blocks are fully written; a block whose progress flag is damaged counts as not written, so it
        is computed again and its flag rewritten."""
        done = np.ones((self.layout.views, self.layout.num_shards), dtype=bool)
        for name in self.flags:
            written, damaged = read_done_flags(self.arrays[name])
            if damaged:
                where = "" if name == DONE else f" in {name}"
                console.print(f"{self.url}: the progress flags of {len(damaged)} blocks are damaged "
                              f"({describe_blocks(damaged)}){where}: computing those blocks again", soft_wrap=True)
            done &= written
        return done

    def write_static(self, arrays: dict[str, np.ndarray]) -> None:
        """The arrays that do not depend on the view (labels, keys, class and prompt embeddings)."""
        with self.full_disk_is_a_user_error():
            for name, values in arrays.items():
                self.arrays[name][...] = values

    def write_block(self, view: int, shard: int, outputs: dict[str, np.ndarray]) -> None:
        """All per-view arrays of one block, then its done flags."""
        start, stop = self.layout.shard_range(shard)
        with self.full_disk_is_a_user_error():
            for name in self.per_view_arrays:
                self.arrays[name][view, start:stop] = outputs[name]
            for name in self.flags:
                self.arrays[name][view, shard] = True


def store_to_add_to(url: str) -> zarr.Group:
    group = open_existing_group(url, mode="r+")
    if group is None or not is_cache(group):
        raise UserError(f"no cache store at {url} to add sources to: precompute it first")
    return group


# A source's record entries that say when and how it was added, not what it is.
ADDITION = "added"


def source_difference(name: str, stored: dict, wanted: dict) -> str | None:
    """Where source `name`'s record in the store first differs from the one a run would write (when and how it was
    added aside), or None."""
    return first_difference({key: value for key, value in stored.items() if key != ADDITION},
                            {key: value for key, value in wanted.items() if key != ADDITION}, name)


def upgraded(attributes: dict) -> dict:
    """Root attributes of schema 1 (a teacher and a CLIP, their sizes in the layout, both flagged in
    `progress/done`) as schema 2 records them; those of schema 2 as they are."""
    if attributes.get("schema_version") == SCHEMA_VERSION:
        return attributes
    attributes = dict(attributes)
    sources = schema_one_sources(attributes["layout"])
    attributes["sources"] = {name: {**source.describe(), **attributes.pop(name)} for name, source in sources.items()}
    attributes["layout"] = Layout.from_record(attributes["layout"]).describe()
    attributes["schema_version"] = SCHEMA_VERSION
    return attributes


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
