"""Reading and writing uncompressed activation chunks straight from and to their Zarr v3 shard files.

Going through zarr costs three copies of every byte (shard bytes, decoded chunk, assembled
result) plus Python work per chunk; for the fit loader, which reads 16 layers x 1152 bytes per
token, that was most of the time (bench/fit.py). When an array is stored uncompressed (the
default, see cache_schema.md), each chunk is its rows in C order at an offset the shard's index
gives, so a row range of a chunk is one contiguous byte range: `os.preadv` puts it where the
caller wants it, one copy. For the fit loader's shuffle, a vectored read with one buffer per row
sends every row to its shuffled place in the same single copy (`scatter_into`; on Linux, through
the C library's preadv, since Python's own takes one Python buffer per row). Writing a whole shard
is likewise one write of the caller's array plus the index: measured here, 0.04-0.3 s of the writer
thread's CPU per 150 MB shard against 0.5-0.6 s through zarr, CPU that a 2-core machine takes
from the forward pass.
Arrays with any other codec chain (or fill value) are read and written through zarr.

The shard format is the Zarr v3 `sharding_indexed` codec's: the index sits at the end of the shard
file, one (offset, nbytes) pair of little-endian uint64 per inner chunk in C order, followed by a
crc32c of the index (checked here). A chunk never written has offset and nbytes 2^64-1; a chunk
that reaches past the shard's rows is stored whole, padded with the fill value (0).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zarr
from numcodecs import CRC32C

from routesae.atomic_files import atomic_open
from routesae.errors import RouteSAEError

_EMPTY = np.uint64(2**64 - 1)  # the index's marker for a chunk never written
# Ends every message about a damaged store file.
VERIFY_HINT = ("the store is damaged: `routesae info --verify STORE` lists every damaged file, "
               "`routesae repair STORE` harvests them again")


class ShardFiles:
    """Row ranges of one 2-D [tokens, d_model] sharded array, read from and written to its shard files."""

    def __init__(self, array_dir: Path, shard_rows: int, chunk_rows: int, row_bytes: int):
        self.array_dir = array_dir
        self.shard_rows = shard_rows
        self.chunk_rows = chunk_rows
        self.row_bytes = row_bytes
        self.chunks_per_shard = shard_rows // chunk_rows
        self._index: dict[int, tuple[tuple[int, int], np.ndarray]] = {}

    @classmethod
    def for_array(cls, array: zarr.Array, array_dir: Path) -> "ShardFiles | None":
        """Direct access when `array` has the plain layout this module understands, else None."""
        meta = array.metadata
        if len(array.shape) != 2 or len(meta.codecs) != 1:
            return None
        shard_codec: Any = meta.codecs[0]
        if type(shard_codec).__name__ != "ShardingCodec" or shard_codec.index_location.value != "end":
            return None
        inner = [type(c).__name__ for c in shard_codec.codecs]
        index_codecs = [type(c).__name__ for c in shard_codec.index_codecs]
        if inner != ["BytesCodec"] or index_codecs != ["BytesCodec", "Crc32cCodec"]:
            return None
        little = getattr(shard_codec.codecs[0].endian, "value", None) == "little"
        dtype = np.dtype(array.dtype)
        if not little and dtype.itemsize > 1:
            return None
        shard_shape = tuple(meta.chunk_grid.chunk_shape)
        chunk_shape = tuple(shard_codec.chunk_shape)
        width = array.shape[1]
        if shard_shape[1] != width or chunk_shape[1] != width or shard_shape[0] % chunk_shape[0]:
            return None
        encoding = meta.chunk_key_encoding
        if getattr(encoding, "name", None) != "default" or getattr(encoding, "separator", None) != "/":
            return None
        if np.asarray(array.fill_value).tobytes() != bytes(dtype.itemsize):
            return None  # padding is written as zero bytes
        return cls(array_dir, shard_shape[0], chunk_shape[0], width * dtype.itemsize)

    def _shard_index(self, fd: int, shard: int) -> np.ndarray:
        """[chunks_per_shard, 2] (offset, nbytes); cached until the file changes."""
        st = os.fstat(fd)
        key = (st.st_mtime_ns, st.st_size)
        hit = self._index.get(shard)
        if hit is not None and hit[0] == key:
            return hit[1]
        size = 16 * self.chunks_per_shard + 4
        raw = os.pread(fd, size, st.st_size - size) if st.st_size >= size else b""
        if len(raw) != size:
            raise RouteSAEError(f"{self._shard_path(shard)}: shard file too short for its index; {VERIFY_HINT}")
        try:
            body = CRC32C(location="end").decode(raw)
        except RuntimeError as e:
            raise RouteSAEError(f"{self._shard_path(shard)}: corrupt shard index ({e}); {VERIFY_HINT}") from None
        index = np.frombuffer(body, dtype="<u8").reshape(self.chunks_per_shard, 2)
        self._index[shard] = (key, index)
        return index

    def _shard_path(self, shard: int) -> Path:
        return self.array_dir / "c" / str(shard) / "0"

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """Rows [start, stop) as pieces contiguous in one shard file: (fd, byte offset, first row, rows).
        The fd is open while its pieces are handed out."""
        row = start
        while row < stop:
            shard = row // self.shard_rows
            shard_stop = min(stop, (shard + 1) * self.shard_rows)
            path = self._shard_path(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                hint = f"; {VERIFY_HINT}" if e.errno == errno.ENOENT else ""
                raise RouteSAEError(f"cannot read {path}: {e.strerror}{hint}") from None
            try:
                index = self._shard_index(fd, shard)
                while row < shard_stop:
                    chunk = row // self.chunk_rows
                    piece_stop = min(shard_stop, (chunk + 1) * self.chunk_rows)
                    offset, nbytes = index[chunk - shard * self.chunks_per_shard]
                    if offset == _EMPTY or nbytes != self.chunk_rows * self.row_bytes:
                        raise RouteSAEError(f"{path}: chunk {chunk} missing or not stored raw; {VERIFY_HINT}")
                    yield fd, int(offset) + (row - chunk * self.chunk_rows) * self.row_bytes, row, piece_stop - row
                    row = piece_stop
            finally:
                os.close(fd)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) into `out` (C-contiguous, [stop-start, width] of this dtype's size)."""
        if out.shape[0] != stop - start or not out.flags.c_contiguous or out.nbytes != (stop - start) * self.row_bytes:
            raise ValueError("out must be C-contiguous with exactly the requested rows")
        dest = memoryview(out.reshape(-1).view(np.uint8))
        for fd, offset, row, n in self._pieces(start, stop):
            at, size = (row - start) * self.row_bytes, n * self.row_bytes
            if os.preadv(fd, [dest[at : at + size]], offset) != size:
                raise RouteSAEError(f"{self._shard_path(row // self.shard_rows)}: shard file shorter than its index says; "
                                   f"{VERIFY_HINT}")

    def scatter_into(self, start: int, stop: int, out: np.ndarray, dest: np.ndarray) -> bool:
        """Row start+i into out[dest[i]], for rows [start, stop): the kernel copies each row from the
        page cache straight to its place (one vectored read per piece of up to IOV_MAX rows), so a
        shuffle costs no copy of its own. `out` is C-contiguous [R, width]; dest int64, within [0, R).
        Returns False, having read nothing, where the C library's preadv cannot be called."""
        if _preadv is None:
            return False
        if not out.flags.c_contiguous or out.ndim != 2 or out.shape[1] * out.itemsize != self.row_bytes:
            raise ValueError("out must be C-contiguous rows of this array's width and item size")
        # a wrong index would make the kernel write outside `out`: every one is checked first
        dest = check_row_indices(dest, stop - start, out.shape[0])
        base = out.ctypes.data
        for fd, offset, row, n in self._pieces(start, stop):
            for lo in range(0, n, _IOV_MAX):
                m = min(_IOV_MAX, n - lo)
                iov = np.empty((m, 2), dtype=np.uint64)  # struct iovec {void *base; size_t len;}
                iov[:, 0] = base + dest[row - start + lo : row - start + lo + m] * self.row_bytes
                iov[:, 1] = self.row_bytes
                want = m * self.row_bytes
                while True:
                    got = _preadv(fd, iov.ctypes.data, m, offset + lo * self.row_bytes)
                    if got >= 0 or ctypes.get_errno() != errno.EINTR:
                        break
                if got != want:
                    err = os.strerror(ctypes.get_errno()) if got < 0 else "shard file shorter than its index says"
                    raise RouteSAEError(f"{self._shard_path(row // self.shard_rows)}: {err}; {VERIFY_HINT}")
        return True

    @property
    def mappable(self) -> bool:
        """Whether whole chunks can be mapped into memory (`map_chunk`): the C library's mmap is
        there and chunks start on page boundaries (raw chunks sit at multiples of their size)."""
        return _libc is not None and (self.chunk_rows * self.row_bytes) % mmap.PAGESIZE == 0

    def map_chunk(self, chunk: int, address: int) -> None:
        """Map chunk `chunk`'s rows, read-only in effect, at `address` (page-aligned, inside a range from
        `reserve_address_space`), replacing what was mapped there: the page cache's own pages, no copy.
        The mapping is private, so a stray write changes a copy, never the store."""
        if not self.mappable:
            raise RouteSAEError(f"{self.array_dir}: chunks of this array cannot be mapped")
        start = chunk * self.chunk_rows
        for fd, offset, _, _ in self._pieces(start, start + self.chunk_rows):
            got = _libc.mmap(address, self.chunk_rows * self.row_bytes, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | _MAP_FIXED, fd, offset)
            if got != address:
                raise RouteSAEError(f"cannot map {self._shard_path(start // self.shard_rows)}: "
                                    f"{os.strerror(ctypes.get_errno())}")

    def remove_partial_writes(self, owns: Callable[[int], bool] = lambda shard: True) -> None:
        """Delete the temporary files of shard writes that were killed before their rename, of the
        shards `owns` accepts (another writer's may be a write in progress)."""
        debris = [*self.array_dir.glob("c/*/.*.tmp"), *self.array_dir.glob("c/*/.*.partial")]  # .partial: before 0.1
        for path in debris:
            if not path.parent.name.isdigit() or owns(int(path.parent.name)):
                path.unlink(missing_ok=True)

    def write_shard(self, shard: int, rows: np.ndarray) -> None:
        """Write shard `shard` whole: `rows` (C-contiguous [n <= shard_rows, width]) are its first n
        rows; chunks past them are left unwritten. The file appears complete or not at all (written
        under a temporary name, then renamed, as zarr's local store does)."""
        n = rows.shape[0]
        if n > self.shard_rows or not rows.flags.c_contiguous or rows.ndim != 2 or rows.nbytes != n * self.row_bytes:
            raise ValueError(f"a shard holds at most {self.shard_rows} C-contiguous rows of {self.row_bytes} bytes")
        chunk_bytes = self.chunk_rows * self.row_bytes
        n_chunks = -(-n // self.chunk_rows)
        index = np.full((self.chunks_per_shard, 2), _EMPTY, dtype="<u8")
        index[:n_chunks, 0] = np.arange(n_chunks, dtype=np.uint64) * np.uint64(chunk_bytes)
        index[:n_chunks, 1] = chunk_bytes
        pad = n_chunks * chunk_bytes - rows.nbytes
        with atomic_open(self._shard_path(shard), "wb", durable=False) as fh:
            fh.write(memoryview(rows.reshape(-1).view(np.uint8)))
            fh.write(bytes(pad))
            fh.write(CRC32C(location="end").encode(index.tobytes()))


def check_row_indices(dest: np.ndarray, n: int, capacity: int) -> np.ndarray:
    """`dest` as contiguous int64 after checking it holds n row indices, each in [0, capacity)."""
    dest = np.ascontiguousarray(dest, dtype=np.int64)
    if dest.shape != (n,):
        raise ValueError(f"dest must hold one row index per row read ({n}), got shape {dest.shape}")
    if n and (int(dest.min()) < 0 or int(dest.max()) >= capacity):
        raise ValueError(f"dest indices must lie in [0, {capacity})")
    return dest


# --- memory maps of shard files (the fit loader's zero-copy buffers) ------------------------------

_PROT_NONE = 0  # not exported by Python's mmap module, nor are the next two (Linux values)
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux 5.14+


def _load_libc() -> Any:
    """The C library with preadv, mmap, munmap and madvise typed, on Linux; else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
        libc.preadv.restype = ctypes.c_ssize_t
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
        libc.mmap.restype = ctypes.c_void_p
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()
# preadv(fd, iov, iovcnt, offset), for scattered reads; Python's own takes one Python buffer per row
_preadv: Callable[[int, int, int, int], int] | None = _libc.preadv if _libc is not None else None


def reserve_address_space(nbytes: int) -> int:
    """A page-aligned range of `nbytes` of address space, inaccessible until chunks are mapped into
    it; no memory is committed. -> its address."""
    addr = _libc.mmap(None, nbytes, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise RouteSAEError(f"cannot reserve {nbytes / 2**30:.1f} GiB of address space: {os.strerror(ctypes.get_errno())}")
    return addr


def release_address_space(address: int, nbytes: int) -> None:
    """Unmap a range from `reserve_address_space` and every chunk mapped into it."""
    _libc.munmap(address, nbytes)


def populate(address: int, nbytes: int) -> None:
    """Bring a mapped range into memory and into the page tables now (reading the disk if the pages
    are not cached), so that touching it later costs no page fault. Kernels before 5.14 only get
    the read-ahead (MADV_WILLNEED)."""
    if nbytes == 0:
        return
    if _libc.madvise(address, nbytes, _MADV_POPULATE_READ) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # an older kernel: ask for read-ahead instead
        _libc.madvise(address, nbytes, _MADV_WILLNEED)
        return
    # EFAULT: a mapped file is shorter than its index says (it changed under us); EIO: the disk
    raise RouteSAEError(f"cannot bring a mapped shard file into memory: {os.strerror(err)}")


def _iov_max() -> int:
    """Buffers one vectored read may take (POSIX guarantees 16; Linux has 1024)."""
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return 16
    return n if 0 < n <= 1024 else 16


_IOV_MAX = _iov_max()
