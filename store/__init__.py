"""The activation store (cache_schema.md), shared by every stage: its writer and reader
(`zarr_store`), direct shard-file I/O (`shard_files`) and its integrity checks (`verify`)."""
