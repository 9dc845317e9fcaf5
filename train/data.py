"""Training batches from the activation cache: chunks in random order, a RAM buffer of several
chunks shuffled at the token level, the next buffer prepared in the background (prefetch.py)
while the current one trains.

Everything is a function of (seed, epoch, buffer index), so the same seed gives the same batches,
and a position (epoch, tokens of the epoch already served) is all a resume needs.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from routesae.errors import RouteSAEError
from routesae.store.zarr_store import TORCH_DTYPES, Cache

REMOTE_READERS = 16
"""Reads in flight at once from a store on object storage (each a ranged request for one layer of
a run of chunks)."""
LOCAL_READERS = 8
"""Reads in flight at once from a local store (each one layer of a run of chunks): a disk serves
several requests at once faster than one after the other (bench/big_store.py: random 4 MiB reads
of a cold store, 734 MB/s one at a time, 1,323 MB/s eight at once), and each read waits on the
disk or copies from the page cache without Python's GIL."""

if TYPE_CHECKING:
    from routesae.train.mapped import MappedBuffer


class Position(NamedTuple):
    """Where a loader stands: `offset` tokens of epoch `epoch` already served."""

    epoch: int
    offset: int


class Batch(NamedTuple):
    """One training batch."""

    acts: Tensor
    """[n, n_layers, d_model] activations, layers in the loader's order, each layer's [n, d_model]
    slice contiguous: in the storage dtype (a strided view into the loader's buffer), or float32
    from the mapped loader (gathered and converted at once, see mapped.py)."""
    position: Position
    """The loader's position after this batch (what a checkpoint stores)."""


@dataclass(frozen=True)
class TokenSplit:
    """Training tokens [0, train_stop) and the held-out tail [train_stop, n_tokens) of a store.

    The boundary sits on a chunk boundary, so training reads whole chunks and the tail holds at
    least the requested number of tokens."""

    n_tokens: int
    chunk_tokens: int
    train_stop: int

    @classmethod
    def of(cls, cache: Cache, eval_tokens: float) -> "TokenSplit":
        """eval_tokens: a fraction of the store if below 1, else a token count (0: no held-out tail)."""
        n, chunk = cache.n_tokens, cache.layout.chunk_tokens
        if eval_tokens < 0:
            raise RouteSAEError(f"--eval-tokens must be non-negative, got {eval_tokens}")
        held = math.ceil(eval_tokens * n) if eval_tokens < 1 else int(eval_tokens)
        stop = n if held == 0 else (n - held) // chunk * chunk
        if stop <= 0:
            raise RouteSAEError(
                f"the store's {n} tokens leave nothing to train on after a held-out tail of {held} tokens "
                f"(the split falls on chunks of {chunk} tokens); lower --eval-tokens or harvest more"
            )
        return cls(n, chunk, stop)

    @property
    def n_chunks(self) -> int:
        """Training chunks (the last one may be partial when there is no held-out tail)."""
        return math.ceil(self.train_stop / self.chunk_tokens)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.train_stop)

    def chunks_per_buffer(self, buffer_tokens: int) -> int:
        """Whole chunks in a shuffle buffer of at most `buffer_tokens` (at least one)."""
        return max(1, buffer_tokens // self.chunk_tokens)

    @property
    def eval_range(self) -> tuple[int, int]:
        return self.train_stop, self.n_tokens


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class BufferReader:
    """Reads one shuffle buffer: a set of chunks, every layer, special tokens dropped, tokens shuffled.

    Used in the trainer's process (thread prefetch) and in the loader process alike."""

    def __init__(self, cache: Cache, layers: list[int], split: TokenSplit, seed: int, include_special: bool,
                 special: np.ndarray | None = None):
        """special: the store's special-token flags over the training split, if already in memory
        (else they are read from the store, buffer by buffer)."""
        self.cache = cache
        self.layers = list(layers)
        self.split = split
        self.seed = seed
        self.include_special = include_special
        self.special = special

    def order(self, epoch: int, index: int, chunks: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
        """The buffer's layout and serving order: (its chunks sorted, the token ranges they cover
        (neighbouring chunks merged), and rows: the i-th token served is row rows[i] of the
        chunks' tokens laid end to end in that order). Only the split's last chunk can be short,
        and it sorts last, so row r is also token r % chunk_tokens of the (r // chunk_tokens)-th chunk."""
        chunks = np.sort(chunks)
        ranges = [(self.split.chunk_range(a)[0], self.split.chunk_range(b - 1)[1]) for a, b in _contiguous_runs(chunks)]
        n_read = sum(b - a for a, b in ranges)
        if self.include_special:
            rows = np.arange(n_read)
        else:
            flags = self.special
            special = np.concatenate([flags[a:b] if flags is not None else self.cache.special(a, b).numpy()
                                      for a, b in ranges])
            rows = np.flatnonzero(~special)
        return chunks, ranges, rows[_rng(self.seed, 1, epoch, index).permutation(rows.size)]

    def read(self, epoch: int, index: int, chunks: np.ndarray, out: Tensor | None = None) -> Tensor:
        """Buffer `index` of `epoch`: [n_layers, T, d_model] in the storage dtype, each layer
        contiguous, the same token order in all. With `out` ([n_layers, R, d_model], R at least the
        chunks' token count, special tokens included) it is written there and a view of it is returned."""
        _, ranges, rows = self.order(epoch, index, chunks)
        n_read = sum(b - a for a, b in ranges)
        # Token rows[i] of the read goes to row i; the special tokens go past the kept ones, where
        # the returned view does not reach. Each row is read straight to its place (one copy).
        dest = np.empty(n_read, dtype=np.int64)
        dest[rows] = np.arange(rows.size)
        if rows.size < n_read:
            dropped = np.ones(n_read, dtype=bool)
            dropped[rows] = False
            dest[dropped] = np.arange(rows.size, n_read)
        dest_t = torch.from_numpy(dest)
        dtype = TORCH_DTYPES[self.cache.storage_dtype]
        shape = (len(self.layers), n_read, self.cache.d_model)
        full = torch.empty(shape, dtype=dtype) if out is None else out[:, :n_read]
        starts = np.cumsum([0] + [b - a for a, b in ranges])
        pieces = [(j, layer, a, b, at) for j, layer in enumerate(self.layers) for (a, b), at in zip(ranges, starts)]

        def read_piece(piece: tuple[int, int, int, int, int]) -> None:
            j, layer, a, b, at = piece  # the pieces write disjoint rows of `full`
            self.cache.acts_scattered(layer, a, b, out=full[j], dest=dest_t[at : at + b - a])

        readers = min(REMOTE_READERS if self.cache.remote else LOCAL_READERS, len(pieces))
        if readers > 1:
            # one request per piece: in flight together, their latencies overlap
            with ThreadPoolExecutor(readers) as pool:
                list(pool.map(read_piece, pieces))
        else:
            for piece in pieces:
                read_piece(piece)
        return full[:, : rows.size]

    def map(self, epoch: int, index: int, chunks: np.ndarray, capacity_chunks: int) -> "MappedBuffer":
        """The same buffer as `read`, its chunks mapped rather than read (see mapped.py)."""
        from routesae.train.mapped import MappedBuffer

        chunks, _, rows = self.order(epoch, index, chunks)
        return MappedBuffer(self.cache, self.layers, chunks, rows, capacity_chunks)


class ChunkLoader:
    """Shuffled training batches from a Cache.

    Per epoch: the training chunks in a random order, cut into buffers of `buffer_tokens // chunk_tokens`
    chunks; each buffer holds every requested layer of its tokens (special tokens dropped unless
    asked for), shuffled at the token level; batches are consecutive slices of the buffers, the
    last batch of an epoch may be short. At most two buffers live in RAM: the one being served and
    the one being prepared. Who prepares it (`workers`, the same batches whichever):
      'process'  a loader process reads it into shared memory (it does not compete with the
                 trainer for Python's GIL, which halved RouteSAE's throughput with a thread);
      'thread'   a thread of this process reads it;
      'mapped'   a thread maps its chunks from the shard files and brings them into memory, and
                 each batch is gathered from there as float32 (mapped.py; no copy of the buffer,
                 the fastest on a CPU; uncompressed stores on Linux, see `can_map`).
    """

    def __init__(
        self,
        cache: Cache,
        layers: list[int],
        split: TokenSplit,
        batch_size: int,
        buffer_tokens: int,
        seed: int,
        include_special: bool = False,
        workers: str = "process",
    ):
        for layer in layers:
            if layer not in cache.layers:
                raise RouteSAEError(f"layer {layer} is not in the store (it holds {cache.layers})")
        if workers not in WORKERS:
            raise ValueError(f"workers must be one of {WORKERS}, got {workers!r}")
        self.cache = cache
        self.layers = list(layers)
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.include_special = include_special
        self.workers = workers
        self.chunks_per_buffer = split.chunks_per_buffer(buffer_tokens)
        if workers == "mapped" and not can_map(cache, layers, self.chunks_per_buffer):
            raise RouteSAEError("the mapped loader cannot serve this fit (a compressed store, chunks not on page "
                                "boundaries, not Linux, or more chunk mappings than vm.max_map_count allows): "
                                "use the 'process' loader")
        self.special: np.ndarray | None = None
        """The special-token flags of the training split, kept for buffers prepared in this process."""
        self.chunk_counts = self._count_tokens()
        if workers == "process":
            self.special = None  # the loader process reads its own
        self.reader = BufferReader(cache, layers, split, seed, include_special, special=self.special)
        self.epoch_tokens = int(self.chunk_counts.sum())
        if self.epoch_tokens == 0:
            raise RouteSAEError("the training split holds no non-special token")

    def _count_tokens(self) -> np.ndarray:
        """Tokens each training chunk contributes (its non-special tokens by default)."""
        split = self.split
        sizes = np.array([b - a for a, b in map(split.chunk_range, range(split.n_chunks))], dtype=np.int64)
        if self.include_special:
            return sizes
        counts = np.zeros(split.n_chunks, dtype=np.int64)
        # one byte per token: a thread preparing buffers then reads no zarr (GIL-heavy) at all
        self.special = np.empty(split.train_stop, dtype=bool)
        step = max(split.chunk_tokens, self.cache.layout.shard_tokens // split.chunk_tokens * split.chunk_tokens)
        for start in range(0, split.train_stop, step):
            stop = min(start + step, split.train_stop)
            self.special[start:stop] = self.cache.special(start, stop).numpy()
            keep = ~self.special[start:stop]
            per_chunk = np.add.reduceat(keep, np.arange(0, stop - start, split.chunk_tokens))
            first = start // split.chunk_tokens
            counts[first : first + len(per_chunk)] = per_chunk
        return counts

    @property
    def buffer_capacity(self) -> int:
        """Most tokens one buffer can hold."""
        return self.chunks_per_buffer * self.split.chunk_tokens

    # --- the plan ----------------------------------------------------------------------------------
    def buffers_of_epoch(self, epoch: int) -> list[np.ndarray]:
        """The chunk indices of each buffer of `epoch`, in serving order."""
        order = _rng(self.seed, 0, epoch).permutation(self.split.n_chunks)
        return [order[i : i + self.chunks_per_buffer] for i in range(0, len(order), self.chunks_per_buffer)]

    def plan(self, start: Position) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """(epoch, buffer index, chunks, tokens of it to skip) from `start` on, forever."""
        epoch, skip = start
        while True:
            for index, chunks in enumerate(self.buffers_of_epoch(epoch)):
                size = int(self.chunk_counts[chunks].sum())
                if skip >= size:
                    skip -= size
                    continue
                yield epoch, index, chunks, skip
                skip = 0
            epoch += 1
            skip = 0

    def load_buffer(self, epoch: int, index: int, chunks: np.ndarray) -> Tensor:
        """Buffer `index` of `epoch` read in this process: [n_layers, T, d_model]."""
        return self.reader.read(epoch, index, chunks)

    def map_buffer(self, epoch: int, index: int, chunks: np.ndarray) -> "MappedBuffer":
        """Buffer `index` of `epoch` mapped in this process (workers='mapped')."""
        return self.reader.map(epoch, index, chunks, self.chunks_per_buffer)

    # --- serving ---------------------------------------------------------------------------------
    def batches(self, start: Position = Position(0, 0)) -> Iterator[Batch]:
        """Endless batches from `start` on, through as many epochs as the caller takes."""
        from routesae.train.prefetch import start_prefetcher

        prefetcher = start_prefetcher(self, start)
        try:
            yield from prefetcher.serve()
        finally:
            prefetcher.close()


WORKERS = ("process", "thread", "mapped")


def can_map(cache: Cache, layers: list[int], chunks_per_buffer: int = 1) -> bool:
    """Whether the 'mapped' loader can serve these layers of this store, with buffers of this many
    chunks: each chunk of each layer is one mapping, and the two live buffers' mappings must stay
    well inside the kernel's limit per process (vm.max_map_count, 65,530 by default)."""
    files = [cache.shard_files(layer) if layer in cache.layers else None for layer in layers]
    if not all(f is not None and f.mappable for f in files):
        return False
    return 2 * len(layers) * chunks_per_buffer <= _max_map_count() // 2


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 65_530


def _contiguous_runs(sorted_chunks: np.ndarray) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 6), (9, 10)]: read neighbouring chunks in one call."""
    runs: list[tuple[int, int]] = []
    for c in sorted_chunks.tolist():
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


class TensorLoader:
    """Batches from activations already in RAM: the trainer's batch source without disk, for
    benchmarks and tests. The tokens are served as given (shuffle them first, e.g. with
    `ChunkLoader.load_buffer` over all chunks); each epoch serves the batch-sized blocks in a fresh
    random order, as views, so serving a batch costs nothing."""

    def __init__(self, acts: Tensor, layers: list[int], batch_size: int, seed: int):
        """acts: [n_layers, N, d_model] in `layers` order."""
        self.acts = acts
        self.layers = list(layers)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch_tokens = acts.shape[1]
        self.n_blocks = math.ceil(self.epoch_tokens / batch_size)

    def batches(self, start: Position = Position(0, 0)) -> Iterator[Batch]:
        epoch, skip = start
        n = self.batch_size
        while True:
            offset = 0
            for block in _rng(self.seed, 2, epoch).permutation(self.n_blocks).tolist():
                acts = self.acts[:, block * n : (block + 1) * n].transpose(0, 1)
                if skip >= acts.shape[0]:
                    skip -= acts.shape[0]
                    offset += acts.shape[0]
                    continue
                offset += acts.shape[0]
                acts, skip = acts[skip:], 0
                yield Batch(acts, Position(epoch, offset))
            epoch += 1
            skip = 0
