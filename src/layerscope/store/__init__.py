"""Store: Zarr v3 layout, shard files, part markers, and the reader."""
