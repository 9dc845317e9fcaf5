"""Preparing the next shuffle buffer while the trainer works on the current one.

Three ways, the same batches: a loader *process* writes buffers into two shared-memory slots; a
*thread* does the same in the trainer's process; or a thread *maps* the buffer's chunks from the
store's files and batches are gathered from the mapping (mapped.py). Reading through zarr is
Python-heavy, and a thread doing it fights the training loop for the GIL: on this project's 2-core
CPU a RouteSAE buffer (16 layers) took 2.4x longer to read from a thread while training ran, and
each step got 1.5x slower; from a process neither slowed down. Mapping holds the GIL only to set
the mappings up (the kernel then fills them with the GIL released), so it runs in a thread. The
plain thread remains as the fallback where shared memory cannot be had (a tiny /dev/shm).

Either way at most two buffers exist: the one being served and the one being prepared.
"""

from __future__ import annotations

import abc
import mmap
import os
import queue
import sys
import threading
from collections import deque
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from routesae.errors import RouteSAEError
from routesae.train.data import Batch, BufferReader, Position, TokenSplit

if TYPE_CHECKING:
    from routesae.train.data import ChunkLoader
    from routesae.train.mapped import MappedBuffer


class TensorBuffer:
    """A buffer read into a tensor [n_layers, T, d_model]: batches are views of it (the same
    interface as mapped.MappedBuffer, whose batches are gathered copies)."""

    takes_copies = False
    """Whether `take` returns a new tensor (else a view that the buffer's refill would overwrite)."""

    def __init__(self, acts: Tensor):
        self.acts = acts

    @property
    def size(self) -> int:
        return self.acts.shape[1]

    def take(self, lo: int, hi: int) -> Tensor:
        """Tokens lo..hi: a view [hi-lo, n_layers, d_model] in the storage dtype."""
        return self.acts[:, lo:hi].transpose(0, 1)

    def close(self) -> None:
        self.acts = None


class _Prefetcher(abc.ABC):
    """Cuts batches out of the buffers a subclass delivers, in serving order."""

    def __init__(self, loader: ChunkLoader, start: Position):
        self.loader = loader
        self.start = start

    @abc.abstractmethod
    def next_buffer(self) -> tuple[int, TensorBuffer | MappedBuffer, int]:
        """-> (epoch, buffer, tokens to skip at its start)."""

    @abc.abstractmethod
    def release(self) -> None:
        """The last buffer delivered is no longer used; its memory may be refilled."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the reader and free its memory."""

    def serve(self) -> Iterator[Batch]:
        n = self.loader.batch_size
        epoch_tokens = self.loader.epoch_tokens
        epoch, offset = self.start
        if offset >= epoch_tokens:
            epoch, offset = epoch + 1, 0
        pending: list[Tensor] = []  # the tail of the previous buffer, shorter than a batch
        while True:
            buf_epoch, buf, skip = self.next_buffer()
            if buf_epoch != epoch:  # a new epoch: the last short batch of the previous one went out
                epoch, offset = buf_epoch, 0
            pos = skip
            size = buf.size
            while pos < size:
                have = sum(p.shape[0] for p in pending)
                take = min(n - have, size - pos)
                piece = buf.take(pos, pos + take)
                pos += take
                if pending or take < n:
                    # a piece that waits for the next buffer must not be a view: its buffer will be refilled
                    pending.append(piece if buf.takes_copies else piece.clone())
                    have += take
                    if have < n and offset + have < epoch_tokens:
                        continue
                    acts = pending[0] if len(pending) == 1 else torch.cat(pending)
                    pending = []
                else:
                    acts = piece
                offset += acts.shape[0]
                yield Batch(acts, Position(epoch, offset))
            buf.close()
            buf = piece = acts = None  # the caller is done with this buffer's batches
            self.release()


# --- in a thread -----------------------------------------------------------------------------------


class ThreadPrefetcher(_Prefetcher):
    """Buffers read (or, with mapped=True, mapped) by a thread of this process."""

    def __init__(self, loader: ChunkLoader, start: Position, mapped: bool = False):
        super().__init__(loader, start)
        self.prepare = loader.map_buffer if mapped else lambda *plan: TensorBuffer(loader.load_buffer(*plan))
        self.slots = threading.Semaphore(2)  # buffers alive at once: served + being filled
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="routesae-loader", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        try:
            for epoch, index, chunks, skip in self.loader.plan(self.start):
                while not self.slots.acquire(timeout=0.1):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                self.ready.put((epoch, self.prepare(epoch, index, chunks), skip))
        except BaseException as e:  # handed to the consumer, which raises it in the main thread
            self.ready.put(e)

    def next_buffer(self) -> tuple[int, TensorBuffer | MappedBuffer, int]:
        while True:
            try:
                item = self.ready.get(timeout=0.1)
            except queue.Empty:
                if not self.thread.is_alive() and self.ready.empty():
                    raise RuntimeError("the loader thread stopped without a word") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def release(self) -> None:
        self.slots.release()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        while not self.ready.empty():  # a buffer prepared but never served
            item = self.ready.get_nowait()
            if isinstance(item, tuple):
                item[1].close()


# --- in a process ----------------------------------------------------------------------------------


def _worker(
    store: str,
    layers: list[int],
    split: TokenSplit,
    seed: int,
    include_special: bool,
    slots: list[Tensor],
    requests,
    results,
    parent_pid: int,
) -> None:
    """The loader process: fill the slot each request names, answer (slot, tokens) or (slot, error)."""
    from routesae.store.zarr_store import Cache

    torch.set_num_threads(1)
    slot = -1
    try:
        reader = BufferReader(Cache.open(store), layers, split, seed, include_special)
        for buf in slots:  # map every page of the slots now, not in the middle of training
            buf.view(-1).view(torch.uint8)[:: mmap.PAGESIZE].zero_()
        while True:
            try:
                item = requests.get(timeout=1.0)
            except queue.Empty:
                try:
                    os.kill(parent_pid, 0)  # the trainer was killed: stop too
                except OSError:
                    return
                continue
            if item is None:
                return
            slot, epoch, index, chunks = item
            buf = reader.read(epoch, index, chunks, out=slots[slot])
            results.put((slot, buf.shape[1]))
    except BaseException as e:  # reported to the trainer as one line
        results.put((slot, str(e) if isinstance(e, RouteSAEError) else f"{type(e).__name__}: {e}"))


_context = None


def _mp_context():
    """forkserver: workers fork from a clean server process (never from the trainer with its
    threads), and after the first one they start in milliseconds."""
    global _context
    if _context is None:
        import torch.multiprocessing as mp

        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(["routesae.train.prefetch"])
    return _context


class ProcessPrefetcher(_Prefetcher):
    """Buffers read by a loader process into two shared-memory slots."""

    @staticmethod
    def allocate_slots(loader: ChunkLoader) -> list[Tensor]:
        """Two buffers' worth of shared memory (fails on a too small /dev/shm)."""
        probe = loader.cache.acts_stored(loader.layers[0], 0, 0)
        shape = (len(loader.layers), loader.buffer_capacity, probe.shape[1])
        return [torch.empty(shape, dtype=probe.dtype).share_memory_() for _ in range(2)]

    def __init__(self, loader: ChunkLoader, start: Position, slots: list[Tensor]):
        super().__init__(loader, start)
        self.slots = slots
        ctx = _mp_context()
        self.requests = ctx.Queue()
        self.results = ctx.Queue()
        self.plan = loader.plan(start)
        self.inflight: deque[tuple[int, int, int]] = deque()  # (slot, epoch, skip), in request order
        self.current: int | None = None
        self.proc = ctx.Process(
            target=_worker,
            args=(str(loader.cache.path), loader.layers, loader.split, loader.seed, loader.include_special,
                  self.slots, self.requests, self.results, os.getpid()),
            name="routesae-loader",
            daemon=True,
        )
        self.proc.start()
        for slot in range(2):
            self._request(slot)

    def _request(self, slot: int) -> None:
        epoch, index, chunks, skip = next(self.plan)
        self.requests.put((slot, epoch, index, chunks))
        self.inflight.append((slot, epoch, skip))

    def next_buffer(self) -> tuple[int, TensorBuffer, int]:
        slot, epoch, skip = self.inflight.popleft()
        while True:
            try:
                done, answer = self.results.get(timeout=0.2)
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RouteSAEError(
                        f"the loader process died (exit code {self.proc.exitcode}); a Python script that "
                        "calls fit() must run it under `if __name__ == '__main__':`, or pass loader='thread'"
                    ) from None
        if isinstance(answer, str):
            raise RouteSAEError(f"the loader process failed: {answer}")
        assert done == slot, "loader answers out of order"
        self.current = slot
        return epoch, TensorBuffer(self.slots[slot][:, :answer]), skip

    def release(self) -> None:
        if self.current is not None:
            self._request(self.current)
            self.current = None

    def close(self) -> None:
        try:
            self.requests.put(None)
            self.proc.join(timeout=10)
        finally:
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout=5)
            self.requests.close()
            self.results.close()


def start_prefetcher(loader: ChunkLoader, start: Position) -> _Prefetcher:
    """The loader's prefetcher: a mapping thread, or a process if it asks for one and shared memory
    is there, else a reading thread."""
    if loader.workers == "mapped":
        return ThreadPrefetcher(loader, start, mapped=True)
    if loader.workers == "process":
        try:
            slots = ProcessPrefetcher.allocate_slots(loader)
        except (OSError, RuntimeError) as e:  # e.g. a /dev/shm too small for two buffers
            print(f"routesae: warning: no shared memory for the loader process ({e}); reading in a thread", file=sys.stderr)
        else:
            return ProcessPrefetcher(loader, start, slots)
    return ThreadPrefetcher(loader, start)
