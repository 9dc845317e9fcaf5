"""A harvest batch's activations from the model's device to the shard's host buffer, in one copy.

On a CPU the capture writes each layer straight into the shard buffer. On CUDA that would be one
blocking device-to-host copy per layer, from inside the forward, into pageable memory (and, where
the forward runs in float32 for a bf16 store, a float32 copy converted on the CPU). So there the
batch is staged: the capture writes every layer into one device buffer in the storage dtype, the
batch's int8 quantization and statistics are computed on the device, and one non-blocking copy
moves the batch into the shard buffer, which is pinned (page-locked) so the copy is a DMA that
returns at once. `wait()` before the shard goes to the writer is the only point that waits for it.

The staging's logic (a device buffer per batch size, what is computed where, the copy back) is
device-independent: `HostStaging(cpu, staged=True)` runs it on a CPU, which is how the tests check
that a staged harvest writes the same store, bit for bit. Pinning and the asynchronous copy are
what only CUDA exercises.
"""

from __future__ import annotations

import torch

from routesae.model.hooks import HiddenStateCapture


class HostStaging:
    """Runs `capture` for a batch and brings its activations to host buffers (see the module)."""

    def __init__(self, device: torch.device, staged: bool | None = None):
        """staged: capture into a device buffer first (default: on CUDA only)."""
        self.device = device
        self.staged = device.type == "cuda" if staged is None else staged
        self.pin = device.type == "cuda"
        self._buffer: torch.Tensor | None = None
        self.staged_batches = 0
        """Batches captured through the device buffer (the tests' evidence that the path ran)."""

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host buffer the batches are copied into: pinned on CUDA (PyTorch's host allocator keeps
        freed pinned blocks for reuse, so a new shard buffer per shard costs no new pinning)."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def capture(self, capture: HiddenStateCapture, input_ids: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        """The hidden states of input_ids [batch, seq] as [n_layers, batch * seq, d] in dest's
        dtype: `dest` itself (that shape; filled) unstaged, else a device buffer, to quantize and
        sum there before `to_host`."""
        batch, seq = input_ids.shape
        n_layers, n, d = dest.shape
        ids = input_ids.to(self.device)
        if not self.staged:
            capture(ids, out=dest.view(n_layers, batch, seq, d))
            return dest
        numel = dest.numel()
        if self._buffer is None or self._buffer.dtype != dest.dtype or self._buffer.numel() < numel:
            self._buffer = torch.empty(numel, dtype=dest.dtype, device=self.device)
        acts = self._buffer[:numel].view(n_layers, n, d)
        capture(ids, out=acts.view(n_layers, batch, seq, d))
        self.staged_batches += 1
        return acts

    def to_host(self, acts: torch.Tensor, dest: torch.Tensor) -> None:
        """Copy `acts` (what `capture` returned, or a tensor computed from it) into `dest`, a view of
        a host buffer; a no-op when it is `dest`. Layer by layer: each layer's rows are contiguous
        in the shard buffer, so each is one DMA (a strided destination would go through a pageable
        temporary). The next batch's forward writes the device buffer only after these copies:
        both are on one stream."""
        if acts is dest:
            return
        for i in range(acts.shape[0]):
            dest[i].copy_(acts[i], non_blocking=self.pin)

    def wait(self) -> None:
        """Wait until every copy to the host has landed (before a shard buffer is handed on)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
