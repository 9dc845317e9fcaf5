"""Data-parallel fit under torchrun: one process (rank) per device, each training on its slice of
every global batch, all of them keeping the same state as one process trained on the whole batch.

How the update stays the single-process one:
- Every rank builds the same loader with the same seed, so all see the same shuffled global
  batches; each trains on a contiguous slice of each (`Group.slice`, sizes as even as they go).
- Gradients: each rank's loss is a mean over its own tokens; scaled by its share n_r / N of the
  batch and summed over ranks (`reduce_gradients`, one all-reduce per SAE), they are the gradient
  of the mean over the whole batch, uneven slices included.
- What a batch decides beyond its gradient is made the same on every rank (`reduce_output`, one
  all-reduce per SAE): the logged means (loss, NormMSE, L0, RouteSAE's route shares, penalties),
  the L0 the sparsity controller steers on, and which latents fired (dead-latent counters, hence
  AuxK's dead set and weight).
- Computations inside an SAE's forward that look at the whole batch ask this module while the
  trainer has `Group.shard` active (outside it they are the plain single-process computation):
  BatchTopK's and Matryoshka's batch-wide top k * N (`global_topk`: exact, the global K-th value
  found from every rank's local top K) and their running inference threshold (`global_min`);
  the first-batch quantile that starts vanilla, gated and JumpReLU at their target L0
  (`gather_rows`: the whole batch's pre-activations); JumpReLU's penalty on the batch's mean L0
  (`token_mean`).
- Normalization needs nothing: per-token statistics are the token's own, dataset scales come
  from the store's statistics.

Rank 0 alone writes the output folder (checkpoints, metrics, SAEs); every rank resumes from the
same checkpoint. Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) none of this runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from routesae.errors import RouteSAEError
from routesae.ranks import current_ranks, init_process_group


@dataclass(frozen=True)
class Shard:
    """This rank's part of the batch being trained."""

    n_local: int
    n_global: int
    replicated: bool
    """True when the batch has fewer tokens than there are ranks: every rank then trains the whole
    batch (weight 1 / world size each), and batch-wide computations need no communication."""

    @property
    def share(self) -> float:
        """Weight of this rank's mean-over-tokens in the batch's mean."""
        return 1.0 / dist.get_world_size() if self.replicated else self.n_local / self.n_global


_current: Shard | None = None
"""The shard being trained, while the trainer's forward runs (None: single-process semantics)."""


def current_shard() -> Shard | None:
    """The shard of the forward running now, or None outside a distributed training forward."""
    return _current


@dataclass
class Group:
    """The torchrun process group this fit runs in."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    # --- data ------------------------------------------------------------------------------------
    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's token range of a batch of n: contiguous slices, the first n % W one longer."""
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def slice(self, acts: Tensor) -> tuple[Tensor, Shard]:
        """This rank's part of the global batch `acts` [n, ...], and its Shard."""
        n = acts.shape[0]
        if n < self.world_size:  # a short last batch: some slice would be empty, so all take all
            return acts, Shard(n, n, True)
        lo, hi = self.bounds(n)
        return acts[lo:hi], Shard(hi - lo, n, False)

    @contextlib.contextmanager
    def shard(self, shard: Shard) -> Iterator[None]:
        """Make `shard` the one batch-wide computations of the SAEs' forwards see."""
        global _current
        _current = shard
        try:
            yield
        finally:
            _current = None

    # --- after the backward ----------------------------------------------------------------------
    def reduce_gradients(self, params: Iterable[torch.nn.Parameter], shard: Shard) -> None:
        """Gradients of the whole batch's mean loss on every rank: share-weighted sum over ranks, in
        one flat all-reduce. Every rank's set of parameters with a gradient is the same (the same
        code on rank-consistent state), so the flat layouts match."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(shard.share)
        dist.all_reduce(flat)
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()

    def reduce_output(self, out, shard: Shard):
        """A TrainOutput with the whole batch's values: means share-weighted and summed, `fired`
        OR-ed over ranks (one all-reduce). `loss` too becomes the batch's, detached: it has been
        backpropagated already."""
        means = [out.nmse, out.aux_loss, out.l0, out.loss.detach(), *out.extra.values()]
        parts = [t.detach().float().reshape(-1) * shard.share for t in means]
        flat = torch.cat([*parts, out.fired.float()])
        dist.all_reduce(flat)
        values, at = [], 0
        for t in means:
            values.append(flat[at : at + t.numel()].view(t.shape))
            at += t.numel()
        fired = flat[at:] > 0
        nmse, aux, l0, loss, *extra = values
        return out._replace(loss=loss, nmse=nmse, aux_loss=aux, l0=l0, fired=fired,
                            extra=dict(zip(out.extra, extra)))

    # --- everything else -------------------------------------------------------------------------
    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` (any picklable value) on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def from_env(device: torch.device) -> Group | None:
    """The process group torchrun set up in the environment (WORLD_SIZE, RANK, LOCAL_RANK; read by
    ranks.py, which the harvest shares), or None for a single process. `device` is the fit's own
    choice: CUDA ranks get one GPU each, from LOCAL_RANK (NCCL); CPU ranks talk over gloo."""
    ranks = current_ranks()
    if not ranks.distributed:
        return None
    if device.type == "cuda":
        device = torch.device(ranks.device(str(device)))
        torch.cuda.set_device(device)  # NCCL's communicator binds to the current device
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise RouteSAEError(f"distributed fit runs on CPU (gloo) or CUDA (NCCL), not {device.type}")
    init_process_group(ranks, backend)
    return Group(ranks.rank, ranks.world_size, device)


# --- batch-wide computations inside a forward ----------------------------------------------------


def token_mean(per_token: Tensor) -> Tensor:
    """The batch's mean of a per-token quantity. Distributed: its value is the whole batch's mean,
    its gradient the local mean's, so that after `reduce_gradients` (local gradients weighted by
    n_r / N) a loss that is any function of the batch mean gets its single-process gradient."""
    shard = current_shard()
    local = per_token.mean()
    if shard is None or shard.replicated:
        return local
    total = per_token.detach().sum().reshape(1).float()
    dist.all_reduce(total)
    whole = (total[0] / shard.n_global).to(local.dtype)
    return whole + (local - local.detach())


def global_min(value: float) -> float:
    """The smallest of every rank's `value` (inf where a rank has none)."""
    shard = current_shard()
    if shard is None or shard.replicated:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t[0])


def gather_rows(local: Tensor) -> Tensor:
    """Every rank's rows [n_r, ...] laid end to end in rank order: the whole batch [N, ...], as one
    process would have it (slices are contiguous and in rank order)."""
    shard = current_shard()
    if shard is None or shard.replicated:
        return local
    world = dist.get_world_size()
    rows = max(-(-shard.n_global // world), 1)  # the longest slice
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[: local.shape[0]] = local
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    sizes = [_slice_size(shard.n_global, r, world) for r in range(world)]
    return torch.cat([part[:size] for part, size in zip(out, sizes)])


def global_topk(flat: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """This rank's members of the `count` largest values over all ranks' `flat` vectors, as
    (values, indices into `flat`), any order. Exact: the global top `count` lies in the union of the
    local tops, so each rank sends its local top `count` (padded with -inf), and the `count`-th
    largest of those is the global cut. Values equal to the cut are shared out in rank order so
    that exactly `count` are kept in all (one process's torch.topk picks among such ties too,
    in its own way)."""
    shard = current_shard()
    if shard is None or shard.replicated:
        return flat.topk(min(count, flat.numel()), sorted=False)
    world = dist.get_world_size()
    local = flat.topk(min(count, flat.numel()), sorted=False).values
    sent = flat.new_full((count,), float("-inf"))
    sent[: local.numel()] = local
    every = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(every, sent)
    cut = torch.cat(every).topk(count, sorted=False).values.min()
    above = flat > cut
    at_cut = (flat == cut).nonzero().squeeze(1)
    counts = torch.tensor([int(above.sum()), at_cut.numel()], dtype=torch.int64, device=flat.device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    table = torch.stack(all_counts).tolist()
    room = count - sum(row[0] for row in table)  # ties to keep, over all ranks
    before = sum(row[1] for row in table[: dist.get_rank()])
    take = max(0, min(room - before, at_cut.numel()))
    indices = torch.cat([above.nonzero().squeeze(1), at_cut[:take]])
    return flat[indices], indices


def _slice_size(n: int, rank: int, world: int) -> int:
    base, extra = divmod(n, world)
    return base + (rank < extra)


def _device() -> torch.device:
    """The device collectives run on: the GPU of this rank under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
