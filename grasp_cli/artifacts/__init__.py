"""Artifacts: the run directory, self-describing manifests, atomic writes, Parquet and Zarr I/O, shards."""
