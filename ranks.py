"""Where this process stands among the processes of one job: its rank, the world size and its
device, read from the environment `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK), and the few
collective steps the stages need (a barrier, sharing one rank's error with the others).

Outside torchrun (no WORLD_SIZE) a process is rank 0 of 1 and nothing here talks to anyone, so a
single-process run is exactly what it was before this module existed. Stages that use it: harvest
(ranks write disjoint shards of one store) and fit (data-parallel training).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from routesae.errors import RouteSAEError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int = 0
    """Global rank, 0 .. world_size-1."""
    world_size: int = 1
    """Processes in the job."""
    local_rank: int = 0
    """Rank on this machine (the GPU it uses)."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that creates, commits and prints."""
        return self.rank == 0

    def device(self, requested: str = "auto") -> str:
        """The device for this rank. Under torchrun a CUDA rank takes GPU `local_rank` ('auto' where
        CUDA is present, or 'cuda' / 'cuda:0' as given: the same command line on every rank), and
        another GPU index is refused; alone, or off CUDA, the device is as asked."""
        if not self.distributed:
            return requested
        if requested == "auto":
            if not torch.cuda.is_available():
                return requested
        elif not requested.startswith("cuda"):
            return requested
        elif torch.device(requested).index not in (None, 0):
            raise RouteSAEError(f"under torchrun each rank takes the GPU of its LOCAL_RANK; give --device cuda, "
                                f"not {requested}")
        if self.local_rank >= torch.cuda.device_count():
            raise RouteSAEError(f"rank {self.rank} (local rank {self.local_rank}) has no GPU: this machine has "
                                f"{torch.cuda.device_count()}; start fewer processes per node")
        return f"cuda:{self.local_rank}"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def share_error(self, message: str | None, source: int = 0) -> None:
        """Rank `source` says whether its step failed; every rank raises the same one-line error if so
        (so no rank waits forever for a rank that gave up)."""
        if not self.distributed:
            if message:
                raise RouteSAEError(message)
            return
        box = [message]
        dist.broadcast_object_list(box, src=source)
        if box[0]:
            raise RouteSAEError(box[0] if self.rank == source else f"rank {source}: {box[0]}")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise RouteSAEError(f"{name}={value!r} is not a whole number") from None


def current_ranks() -> Ranks:
    """The job this process belongs to, from torchrun's environment (rank 0 of 1 without it)."""
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local = _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise RouteSAEError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Ranks(rank, world, rank if local is None else local)


def init_process_group(ranks: Ranks, backend: str | None = None, timeout_s: float = 1800) -> None:
    """Join the job's process group (once per process; nothing for a single process).

    gloo unless told otherwise: the harvest only needs barriers, which gloo does on any device."""
    if not ranks.distributed or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise RouteSAEError(f"WORLD_SIZE is {ranks.world_size} but MASTER_ADDR is not set: start the job with torchrun")
    dist.init_process_group(backend or "gloo", rank=ranks.rank, world_size=ranks.world_size,
                            timeout=timedelta(seconds=timeout_s))
