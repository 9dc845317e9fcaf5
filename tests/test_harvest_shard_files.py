"""The direct shard-file reader (store/shard_files.py) against zarr's own reads of the same store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routesae import Cache
from routesae.errors import RouteSAEError
from routesae.store.zarr_store import TORCH_DTYPES

from synthetic_store import make_store

# chunks of 32 tokens, shards of 64: 200 tokens end inside the fourth shard
KW = dict(n_tokens=224, d_model=8, layers=[1, 3], context_len=16, chunk_contexts=2, shard_chunks=2)


def _zarr_read(cache: Cache, layer: int, start: int, stop: int) -> torch.Tensor:
    """The same rows through zarr's own reader: the independent reference."""
    raw = cache._arrays[layer][start:stop]
    t = torch.from_numpy(raw)
    return t.view(torch.bfloat16) if cache.storage_dtype == "bfloat16" else t


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so equality is bit for bit (empty tensors included)."""
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_raw_reads_equal_zarr_reads(tmp_path, dtype):
    cache = make_store(tmp_path / "s.zarr", storage_dtype=dtype, compression="none", **KW)
    assert all(cache._raw[layer] is not None for layer in cache.layers)  # uncompressed: the direct path
    rng = np.random.default_rng(0)
    # whole store, single rows, chunk and shard boundaries, empty range, and random ranges
    ranges = [(0, 224), (0, 1), (223, 224), (31, 33), (63, 65), (60, 130), (5, 5)]
    ranges += [tuple(sorted(rng.integers(0, 225, 2))) for _ in range(20)]
    for layer in cache.layers:
        for a, b in ranges:
            got = cache.acts_stored(layer, int(a), int(b))
            assert got.dtype == TORCH_DTYPES[dtype] and got.shape == (b - a, 8)
            assert torch.equal(_bits(got), _bits(_zarr_read(cache, layer, int(a), int(b))))


def test_read_into_a_preallocated_view(tmp_path):
    cache = make_store(tmp_path / "s.zarr", storage_dtype="bfloat16", compression="none", **KW)
    big = torch.full((300, 8), 7.0, dtype=torch.bfloat16)
    out = big[50:150]
    assert cache.acts_stored(3, 40, 140, out=out) is out
    assert torch.equal(out, _zarr_read(cache, 3, 40, 140))
    assert (big[:50] == 7).all() and (big[150:] == 7).all()  # nothing written outside `out`
    with pytest.raises(ValueError):
        cache.acts_stored(3, 0, 10, out=torch.empty(10, 8, dtype=torch.float32))  # wrong dtype
    with pytest.raises(ValueError):
        cache.acts_stored(3, 0, 10, out=torch.empty(10, 16, dtype=torch.bfloat16)[:, ::2])  # not contiguous


def test_compressed_stores_read_through_zarr(tmp_path):
    plain = make_store(tmp_path / "a.zarr", compression="none", **KW)
    packed = make_store(tmp_path / "b.zarr", compression="blosc-zstd", **KW)
    assert all(packed._raw[layer] is None for layer in packed.layers)
    for layer in plain.layers:
        assert torch.equal(packed.acts_stored(layer, 10, 200), plain.acts_stored(layer, 10, 200))


def test_a_corrupt_shard_index_is_a_clean_error(tmp_path):
    cache = make_store(tmp_path / "s.zarr", compression="none", **KW)
    shard = tmp_path / "s.zarr" / "acts" / "1" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index, which its crc32c covers
    shard.write_bytes(bytes(data))
    assert cache.acts_stored(1, 0, 64).shape == (64, 8)  # shard 0 is intact
    with pytest.raises(RouteSAEError, match="corrupt shard index"):
        Cache.open(tmp_path / "s.zarr").acts_stored(1, 60, 70)


def test_a_missing_shard_file_is_a_clean_error(tmp_path):
    make_store(tmp_path / "s.zarr", compression="none", **KW)
    (tmp_path / "s.zarr" / "acts" / "3" / "c" / "2" / "0").unlink()
    with pytest.raises(RouteSAEError, match="cannot read"):
        Cache.open(tmp_path / "s.zarr").acts_stored(3, 100, 140)


def test_an_unfinished_store_reads_only_committed_shards(tmp_path):
    cache = make_store(tmp_path / "s.zarr", compression="none", finish=False, **KW)
    assert cache.n_tokens == 224
    torch.testing.assert_close(cache.acts(1, 192, 224), _zarr_read(cache, 1, 192, 224).float())


@pytest.mark.parametrize("compression,preadv", [("none", True), ("none", False), ("blosc-zstd", True)])
def test_scattered_reads_put_each_row_at_its_place(tmp_path, monkeypatch, compression, preadv):
    import routesae.store.shard_files as shard_files

    if not preadv:  # as where the C library's preadv cannot be had: read, then copy
        monkeypatch.setattr(shard_files, "_preadv", None)
    cache = make_store(tmp_path / "s.zarr", storage_dtype="bfloat16", compression=compression, **KW)
    a, b = 20, 150  # crosses chunk and shard boundaries
    dest = torch.from_numpy(np.random.default_rng(1).permutation(200)[: b - a].copy())
    out = torch.zeros(200, 8, dtype=torch.bfloat16)
    cache.acts_scattered(3, a, b, out=out, dest=dest)
    ref = _zarr_read(cache, 3, a, b)
    assert torch.equal(_bits(out[dest]), _bits(ref))
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[dest] = False
    assert (out[untouched] == 0).all()
    for bad in (dest.clone().fill_(200), dest.clone().fill_(-1), dest[:-1]):  # outside `out`, or too few
        with pytest.raises(ValueError):
            cache.acts_scattered(3, a, b, out=out, dest=bad)


@pytest.mark.parametrize("n_tokens", [208, 224, 192])  # last shard ends mid-chunk, on a chunk, on the shard
def test_direct_shard_writes_are_byte_identical_to_zarrs(tmp_path, n_tokens):
    import routesae.store.zarr_store as store_mod

    kw = {**KW, "n_tokens": n_tokens, "storage_dtype": "bfloat16", "compression": "none", "context_len": 16}
    direct = make_store(tmp_path / "direct.zarr", **kw)
    assert all(f is not None for f in store_mod.StoreWriter.open(tmp_path / "direct.zarr").files.values())
    real = store_mod.ShardFiles.for_array
    store_mod.ShardFiles.for_array = classmethod(lambda cls, array, array_dir: None)  # zarr writes everything
    try:
        via_zarr = make_store(tmp_path / "zarr.zarr", **kw)
    finally:
        store_mod.ShardFiles.for_array = real
    files = sorted(p.relative_to(tmp_path / "zarr.zarr") for p in (tmp_path / "zarr.zarr" / "acts").rglob("*") if p.is_file())
    assert files and files == sorted(
        p.relative_to(tmp_path / "direct.zarr") for p in (tmp_path / "direct.zarr" / "acts").rglob("*") if p.is_file()
    )
    for rel in files:
        assert (tmp_path / "direct.zarr" / rel).read_bytes() == (tmp_path / "zarr.zarr" / rel).read_bytes(), rel
    for layer in direct.layers:
        assert torch.equal(_bits(direct.acts_stored(layer, 0, n_tokens)), _bits(via_zarr.acts_stored(layer, 0, n_tokens)))


def test_reopening_a_store_for_writing_removes_killed_writes(tmp_path):
    from routesae.store.zarr_store import StoreWriter

    make_store(tmp_path / "s.zarr", compression="none", finish=False, **KW)
    folder = tmp_path / "s.zarr" / "acts" / "1" / "c" / "2"
    debris = [folder / ".0.12345.678.tmp", folder / ".0.12345.partial"]  # today's temp name, and an older one
    for d in debris:
        d.write_bytes(b"half a shard")
    StoreWriter.open(tmp_path / "s.zarr")
    assert not any(d.exists() for d in debris)
    assert (tmp_path / "s.zarr" / "acts" / "1" / "c" / "2" / "0").is_file()
