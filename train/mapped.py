"""Zero-copy shuffle buffers: a buffer's chunks mapped from the shard files, batches gathered from them.

Why: on a CPU the trainer and the loader share the cores, and reading a buffer copies every byte
of it out of the kernel's page cache. For RouteSAE (16 layers x 1152 bytes per token) that copy
was 0.26 s of kernel time per 65k-token buffer, taken from the trainer's two threads: most of the
gap between training from the store and from RAM (bench/fit.py). Mapped instead, the page cache's
own pages appear in the trainer's address space: a buffer costs its page-table entries (about
0.05-0.08 s, spent by the prefetch thread inside the kernel, without the GIL), and the one copy left
is each batch's gather from the shuffled rows, which also converts to float32, the conversion
every SAE starts with anyway (it then costs nothing). Measured: gathering a RouteSAE batch and
converting it took 52 ms, against 47 ms for converting a batch already in place.

The buffer is the same one `BufferReader.read` makes, token for token and in the same order; only
where its bytes live differs. Each layer's chunks are mapped end to end into one reserved address
range, so a layer is a single [rows, d_model] tensor to index. Needs Linux and chunks that start on
page boundaries (`ShardFiles.mappable`); uncompressed stores only.
"""

from __future__ import annotations

import ctypes
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from routesae.store.shard_files import populate, release_address_space, reserve_address_space
from routesae.store.zarr_store import TORCH_DTYPES, Cache
from routesae.train.data import LOCAL_READERS


class MappedBuffer:
    """One shuffle buffer over mapped chunks: `take(lo, hi)` gathers tokens lo..hi of its serving order."""

    takes_copies = True
    """`take` returns new tensors, which outlive the buffer (see prefetch.TensorBuffer)."""

    def __init__(self, cache: Cache, layers: list[int], chunks: np.ndarray, rows: np.ndarray, capacity_chunks: int):
        """chunks: sorted chunk indices; rows: serving order as rows of those chunks laid end to end
        (`BufferReader.order`); capacity_chunks: chunks per buffer (the same reserved size for all)."""
        files = [cache.shard_files(layer) for layer in layers]
        first = files[0]
        self.rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        self.dtype = TORCH_DTYPES[cache.storage_dtype]
        d = cache.d_model
        chunk_bytes = first.chunk_rows * first.row_bytes
        layer_bytes = capacity_chunks * chunk_bytes
        self._nbytes = len(layers) * layer_bytes
        self._address = reserve_address_space(self._nbytes)
        # unmapped when closed, or at the latest when collected (a view left behind would read freed
        # address space, so nothing hands out views of `region`: `take` returns copies)
        self._release = weakref.finalize(self, release_address_space, self._address, self._nbytes)
        try:
            for j, f in enumerate(files):
                base = self._address + j * layer_bytes
                for slot, chunk in enumerate(chunks.tolist()):
                    f.map_chunk(chunk, base + slot * chunk_bytes)
            # brought in chunk by chunk, several at once: a cold store's disk serves parallel
            # requests faster (data.LOCAL_READERS), and madvise runs without Python's GIL
            starts = [self._address + j * layer_bytes + slot * chunk_bytes
                      for j in range(len(files)) for slot in range(len(chunks))]
            if len(starts) > 1 and LOCAL_READERS > 1:
                with ThreadPoolExecutor(min(LOCAL_READERS, len(starts))) as pool:
                    list(pool.map(lambda a: populate(a, chunk_bytes), starts))
            else:
                for a in starts:
                    populate(a, chunk_bytes)
        except BaseException:
            self.close()
            raise
        mem = (ctypes.c_char * self._nbytes).from_address(self._address)
        self.region = torch.frombuffer(mem, dtype=self.dtype).view(len(layers), capacity_chunks * first.chunk_rows, d)

    @property
    def size(self) -> int:
        """Tokens the buffer serves."""
        return self.rows.numel()

    def take(self, lo: int, hi: int) -> Tensor:
        """Tokens lo..hi of the serving order: float32 [hi-lo, n_layers, d_model], a new tensor
        (laid out layer-major, [n_layers, n, d] transposed, as a float32 copy of the loaders' views is)."""
        idx = self.rows[lo:hi]
        n_layers, _, d = self.region.shape
        out = torch.empty(n_layers, idx.numel(), d, dtype=torch.float32)
        if self.dtype == torch.float32:
            for j in range(n_layers):
                torch.index_select(self.region[j], 0, idx, out=out[j])
        else:
            # the gather lands in a small cache-resident tensor, converted from there
            tmp = torch.empty(idx.numel(), d, dtype=self.dtype)
            for j in range(n_layers):
                torch.index_select(self.region[j], 0, idx, out=tmp)
                out[j].copy_(tmp)
        return out.transpose(0, 1)

    def close(self) -> None:
        """Unmap the chunks (the batches taken stay valid: they are copies)."""
        self.region = None
        self._release()
