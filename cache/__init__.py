"""The teacher-output cache: the Zarr store's schema, writer and reader."""
