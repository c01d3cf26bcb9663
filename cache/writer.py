"""Creating a cache store, or continuing an unfinished one, and writing it block by block."""

from __future__ import annotations

import contextlib

import numpy as np
import zarr

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
        # The group and its attributes land in one metadata write: a store is either recognisable or absent.
        attributes = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **provenance}
        with out_of_space_is_a_user_error(url, FULL_DISK_ADVICE):
            try:
                group = zarr.create_group(store_location(url), overwrite=group is not None, attributes=attributes)
            except zarr.errors.ContainsGroupError:  # another process of a parallel run made it meanwhile
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
