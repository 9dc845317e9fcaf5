"""Finding damaged files in a store: `check_files` looks at every committed file's presence, size
and shard index (what `routesae info` does, in well under a second); `verify` also reads every
committed chunk through its codecs and compares each layer's activations with the statistics the
harvest gathered while writing them (`routesae info --verify`).

What can be found: a missing, truncated or overwritten file, a corrupt shard index (crc32c), a
compressed chunk that no longer decodes, and, through the statistics, a change large enough to move
a layer's mean norm by more than `STATS_RTOL` (a zeroed chunk of a small store, a flipped exponent
bit). Uncompressed chunks carry no checksum of their own in Zarr's format, so a small change to the
bytes of one is invisible to every reader, this one included.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import zarr
from numcodecs import CRC32C
from tqdm.auto import tqdm

from routesae.errors import RouteSAEError

from routesae.store.location import zarr_store
from routesae.store.shard_files import VERIFY_HINT
from routesae.store.zarr_store import TOKEN_ARRAYS, Cache, first_line, shard_path, shard_rows, tensor_of_bits

STATS_RTOL = 1e-4
"""Relative difference of a layer's summed norms beyond which its values changed since the harvest
(its float32 per-batch sums agree with a float64 recount to ~1e-6)."""
_EMPTY = 2**64 - 1


class Damage(NamedTuple):
    """One damaged file (or, for a statistics mismatch, one damaged array)."""

    path: Path
    array: str
    problem: str


class VerifyResult(NamedTuple):
    """What `verify` found."""

    files: int
    """Files checked."""
    bytes_read: int
    """Bytes of activations read and decoded."""
    damage: list[Damage]
    """Every problem found, in array order; empty for a sound store."""


class _File(NamedTuple):
    array: str
    zarr_array: zarr.Array
    shard: int
    start: int
    stop: int
    path: Path


def _array_names(cache: Cache) -> list[str]:
    scales = [f"scales/{layer}" for layer in cache.layers] if cache.quantized else []
    return [*TOKEN_ARRAYS, *scales, *(f"acts/{layer}" for layer in cache.layers)]


def _files(cache: Cache, group: zarr.Group, name: str) -> Iterator[_File]:
    """The files of array `name` that hold committed tokens."""
    array = group[name]
    rows = shard_rows(array)
    for shard in range(-(-cache.n_tokens // rows)):
        start, stop = shard * rows, min((shard + 1) * rows, cache.n_tokens)
        yield _File(name, array, shard, start, stop, shard_path(cache.path / name, array, shard))


def _codecs(array: zarr.Array) -> tuple[list[str], list[str]]:
    """(the codec chain's names, the sharding codec's inner chain's names or [])."""
    codecs = list(array.metadata.codecs)
    names = [type(c).__name__ for c in codecs]
    inner = [type(c).__name__ for c in codecs[0].codecs] if names == ["ShardingCodec"] else []
    return names, inner


def _check_structure(f: _File) -> str | None:
    """What is wrong with a file judged by its size and index alone, or None."""
    if not f.path.is_file():
        return "missing"
    size = f.path.stat().st_size
    array = f.zarr_array
    names, inner = _codecs(array)
    itemsize = np.dtype(array.dtype).itemsize
    row_bytes = itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    if names == ["ShardingCodec"]:
        chunk_rows = int(array.chunks[0])
        n_chunks = shard_rows(array) // chunk_rows
        index_bytes = 16 * n_chunks + 4
        if size < index_bytes:
            return f"truncated: {size:,} bytes, less than its shard index ({index_bytes:,} bytes)"
        with f.path.open("rb") as fh:
            fh.seek(size - index_bytes)
            raw = fh.read(index_bytes)
        try:
            index = np.frombuffer(CRC32C(location="end").decode(raw), dtype="<u8").reshape(n_chunks, 2)
        except RuntimeError:
            return "corrupt shard index (crc32c mismatch; a truncated or overwritten file)"
        data_end = size - index_bytes
        for chunk in range(-(-(f.stop - f.start) // chunk_rows)):
            offset, nbytes = (int(v) for v in index[chunk])
            if offset == _EMPTY:
                return f"chunk {chunk} of the shard was never written"
            if offset + nbytes > data_end:
                return f"truncated: chunk {chunk} ends at byte {offset + nbytes:,} of {data_end:,}"
            if inner == ["BytesCodec"] and nbytes != chunk_rows * row_bytes:
                return f"chunk {chunk} holds {nbytes:,} bytes, an uncompressed chunk {chunk_rows * row_bytes:,}"
        return None
    if names == ["BytesCodec", "BloscCodec"] and size >= 16:
        # a blosc frame's header gives its uncompressed and total sizes (bytes 4-7 and 12-15)
        with f.path.open("rb") as fh:
            header = fh.read(16)
        nbytes, cbytes = struct.unpack_from("<I", header, 4)[0], struct.unpack_from("<I", header, 12)[0]
        if cbytes != size:
            return f"truncated or overwritten: {size:,} bytes, its blosc header says {cbytes:,}"
        if nbytes != shard_rows(array) * row_bytes:
            return f"its blosc header says {nbytes:,} bytes uncompressed, the chunk holds {shard_rows(array) * row_bytes:,}"
    elif size == 0:
        return "empty file"
    return None


def check_files(cache: Cache) -> tuple[int, list[Damage]]:
    """Every committed file's presence, size and index. -> (files checked, damage found)."""
    group = zarr.open_group(zarr_store(cache.path, read_only=True), mode="r", zarr_format=3)
    count, damage = 0, []
    for name in _array_names(cache):
        for f in _files(cache, group, name):
            count += 1
            problem = _check_structure(f)
            if problem:
                damage.append(Damage(f.path, name, problem))
    return count, damage


def raise_if_damaged(cache: Cache) -> None:
    """`check_files`, for a command about to read the store: the first damaged file as one line."""
    _, damage = check_files(cache)
    if damage:
        d = damage[0]
        more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
        raise RouteSAEError(f"{d.path}: {d.problem}{more}; {VERIFY_HINT}")


class _LayerSums(NamedTuple):
    count: int
    sum_norm: float
    sum_sq_norm: float


def verify(cache: Cache, progress: bool = True) -> VerifyResult:
    """Check every committed file's structure, decode every chunk, and compare each layer with the
    statistics the harvest recorded. Reads the whole store once, a shard of one layer at a time."""
    count, damage = check_files(cache)
    broken = {d.path for d in damage}
    group = zarr.open_group(zarr_store(cache.path, read_only=True), mode="r", zarr_format=3)

    special: dict[int, np.ndarray] = {}  # token start of a file -> its flags
    for name in TOKEN_ARRAYS:
        for f in _files(cache, group, name):
            if f.path in broken:
                continue
            try:
                values = f.zarr_array[f.start : f.stop]
            except Exception as e:
                damage.append(Damage(f.path, name, f"does not decode ({first_line(e)})"))
                broken.add(f.path)
                continue
            if name == "positions":
                want = np.arange(f.start, f.stop) % cache.context_len
                if not np.array_equal(values, want):
                    damage.append(Damage(f.path, name, "positions are not t % context_len"))
            elif name == "special":
                special[f.start] = values
    flags_whole = not any(d.array == "special" for d in damage)

    stats = cache.attrs["progress"]["stats"]
    total = sum(f.stop - f.start for layer in cache.layers for f in _files(cache, group, f"acts/{layer}"))
    itemsize = np.dtype(group[f"acts/{cache.layers[0]}"].dtype).itemsize
    bar = tqdm(total=total * cache.d_model * itemsize, unit="B", unit_scale=True, desc="verify",
               disable=not progress, dynamic_ncols=True)
    bytes_read = 0
    try:
        for i, layer in enumerate(cache.layers):
            name = f"acts/{layer}"
            sums = _LayerSums(0, 0.0, 0.0)
            complete = True
            for f in _files(cache, group, name):
                size = (f.stop - f.start) * cache.d_model * itemsize
                bar.update(size)
                if f.path in broken:
                    complete = False
                    continue
                try:
                    x = _read_acts(cache, group, layer, f)
                except Exception as e:
                    damage.append(Damage(f.path, name, _reason(e, f.path)))
                    complete = False
                    continue
                bytes_read += size
                flags = special.get(f.start)  # the token arrays' chunks are the shards of acts
                if flags is None or flags.shape[0] != f.stop - f.start:
                    complete = False
                    continue
                keep = torch.from_numpy(~flags)
                sq = x[keep].double().pow(2).sum(-1)
                sums = _LayerSums(sums.count + int(keep.sum()), sums.sum_norm + float(sq.sqrt().sum()),
                                  sums.sum_sq_norm + float(sq.sum()))
            if complete and flags_whole and stats:
                problem = _compare_stats(sums, stats, i)
                if problem:
                    damage.append(Damage(cache.path / name, name, problem))
    finally:
        bar.close()
    order = {name: i for i, name in enumerate(_array_names(cache))}
    damage.sort(key=lambda d: (order.get(d.array, len(order)), str(d.path)))
    return VerifyResult(count, bytes_read, damage)


def _read_acts(cache: Cache, group: zarr.Group, layer: int, f: _File) -> torch.Tensor:
    """A file's committed rows as float32, through its codecs (zarr), or straight from an
    uncompressed shard file as every reader does (int8 stores: dequantized, as every reader does)."""
    if cache.shard_files(layer) is not None or cache.quantized:
        return cache.acts(layer, f.start, f.stop)
    return tensor_of_bits(group[f.array][f.start : f.stop], cache.storage_dtype).float()


def _reason(e: Exception, path: Path) -> str:
    """What a failed read says of the file, without the file's name or the advice to verify."""
    if isinstance(e, RouteSAEError):
        return str(e).removeprefix(f"{path}: ").split("; ")[0]
    return f"does not decode ({first_line(e)})"


def _compare_stats(sums: _LayerSums, stats: dict, i: int) -> str | None:
    if sums.count != stats["count"]:
        return f"{sums.count:,} non-special tokens counted, the harvest recorded {stats['count']:,}"
    for key, value in (("sum_norm", sums.sum_norm), ("sum_sq_norm", sums.sum_sq_norm)):
        recorded = stats[key][i]
        if abs(value - recorded) > STATS_RTOL * max(abs(recorded), 1e-30):
            what = "mean norm" if key == "sum_norm" else "mean squared norm"
            n = max(sums.count, 1)
            return (f"values changed since the harvest: {what} {value / n:.6g} now, {recorded / n:.6g} recorded "
                    "(some file of this layer was modified)")
    return None
