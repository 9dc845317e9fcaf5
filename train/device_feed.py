"""Batches from the loader's host memory to the training device.

On a CPU a batch is trained where the loader left it. On CUDA a copy from ordinary (pageable)
memory blocks the Python thread until it is done, whatever `non_blocking` says, and the loader's
batches are strided views into a shared buffer that the loader process refills once it is served.
So each batch is staged: gathered into one of two pinned (page-locked) host tensors, layer by
layer, then copied to the GPU on a stream of its own, the training stream waiting for that copy
only. The thread goes on to the next batch while the GPU copies and trains; a staging tensor is
written again only after its copy's event says the GPU has read it.

The staging itself (slot rotation, the layer-major layout, a short last batch, a change of dtype)
is device-independent: `DeviceFeed(cpu, staged=True)` runs it on a CPU with plain tensors and
no-op events, which is how the tests reach it without a GPU. Pinning, the copy stream and the
events are what only CUDA exercises.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

STAGING_SLOTS = 2
"""Staging tensors in rotation: one being copied to the GPU while the next batch is gathered."""


class _Event(Protocol):
    def synchronize(self) -> None: ...


class _DoneEvent:
    """A copy that is over when issued (the CPU's): nothing to wait for."""

    def synchronize(self) -> None:
        pass


class DeviceFeed:
    """`feed(acts)`: a loader batch [n, n_layers, d_model] (any dtype, any strides) as a tensor on
    `device` with the same values, shape and dtype, owned by the caller (never a view of memory
    the loader or the feed reuses)."""

    def __init__(self, device: torch.device, staged: bool | None = None):
        """staged: gather through the staging tensors (default: on CUDA only)."""
        self.device = device
        self.staged = device.type == "cuda" if staged is None else staged
        self.pin = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and self.staged else None
        self._flat: list[Tensor | None] = [None] * STAGING_SLOTS
        self._events: list[_Event | None] = [None] * STAGING_SLOTS
        self._next = 0
        self.staged_batches = 0
        """Batches that went through staging (the tests' evidence that the path ran)."""

    def __call__(self, acts: Tensor) -> Tensor:
        if not self.staged or acts.device.type != "cpu":  # staging is for host memory, not a batch on a GPU
            return acts.to(self.device)
        n, n_layers, d = acts.shape
        slot = self._next
        self._next = (slot + 1) % STAGING_SLOTS
        event = self._events[slot]
        if event is not None:
            event.synchronize()  # the GPU must have read this staging tensor before it is overwritten
        # Layer-major ([n_layers, n, d], contiguous): each layer's rows are one contiguous run in the
        # loader's buffer, so the gather is n_layers memcpys, and the copy to the GPU is one block.
        stage = self._staging(slot, acts.dtype, n_layers * n * d).view(n_layers, n, d)
        stage.copy_(acts.transpose(0, 1))
        out, self._events[slot] = self._upload(stage)
        self.staged_batches += 1
        return out.transpose(0, 1)  # [n, n_layers, d], laid out as the loader's own batches are

    def _staging(self, slot: int, dtype: torch.dtype, numel: int) -> Tensor:
        """Slot `slot`'s first `numel` elements; (re)allocated when too small or of another dtype,
        so batches of one size reuse it and a short last batch takes its front."""
        flat = self._flat[slot]
        if flat is None or flat.dtype != dtype or flat.numel() < numel:
            flat = torch.empty(numel, dtype=dtype, pin_memory=self.pin)
            self._flat[slot] = flat
        return flat[:numel]

    def _upload(self, stage: Tensor) -> tuple[Tensor, _Event]:
        """The staged batch on the device, and the event that says the staging tensor is free again."""
        if self.stream is None:
            # same device (the CPU): a copy, since the staging tensor is reused two batches on
            return stage.to(self.device, copy=True), _DoneEvent()
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            out = stage.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        compute.wait_stream(self.stream)  # training on `out` starts after its copy, nothing else waits
        out.record_stream(compute)  # its memory is not handed out again while training still reads it
        return out, event
