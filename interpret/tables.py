"""The per-latent tables of the contexts pass, each of a fixed size whatever the store's: a latent's
top activations (no two windows overlapping), a uniform sample of its activations, windows where
it is zero, and the RouteSAE paper's (latent, token) groups. Every `add` takes one batch of whole
contexts, so windows of different batches never overlap and the tables merge batch by batch exactly.

Vocabulary: a batch's *rows* are its tokens (0..n-1); *tokens* are store indices (batch start + row).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

NEG = float("-inf")


class Batch(NamedTuple):
    """One batch of whole contexts, with its non-zero latents."""

    offset: int
    """Store index of row 0."""
    rows: Tensor
    """[E] row of each entry."""
    latents: Tensor
    """[E] latent of each entry."""
    values: Tensor
    """[E] activation of each entry (> 0)."""
    layers: Tensor
    """[E] layer index of each entry (-1 where the SAE has none)."""
    win_start: Tensor
    """[n] row where the window around each row starts."""
    win_stop: Tensor
    """[n] row one past where it stops."""
    dense: Tensor
    """[n, n_latents] the same code, dense (zeros elsewhere)."""


def grouped(groups: Tensor, key: Tensor, n_groups: int, descending: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Entries sorted by group, then by key -> (order, rank within its group, entries per group)."""
    order = torch.sort(key, descending=descending, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]
    g = groups[order]
    counts = torch.bincount(g, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    return order, torch.arange(order.numel()) - starts[g], counts


def window_acts(dense: Tensor, latents: Tensor, start: Tensor, stop: Tensor, width: int) -> Tensor:
    """[C] windows of rows [start, stop) of latent columns -> [C, width] float16 activations, 0-padded."""
    offs = torch.arange(width)
    rows = (start[:, None] + offs).clamp_max(dense.shape[0] - 1)
    acts = dense[rows, latents[:, None]]
    return torch.where(offs < (stop - start)[:, None], acts, 0).half()


def greedy_nms(value: Tensor, start: Tensor, stop: Tensor, keep: int) -> Tensor:
    """[G, M] candidates per group, by value descending (-inf: none) -> [G, M] bool, the first `keep`
    that overlap no larger one kept before them: greedy non-maximum suppression of windows."""
    valid = value > NEG
    overlap = (start[:, :, None] < stop[:, None, :]) & (start[:, None, :] < stop[:, :, None])
    kept = torch.zeros_like(valid)
    n_kept = torch.zeros(value.shape[0], dtype=torch.long)
    for j in range(value.shape[1]):
        clash = (overlap[:, j, :j] & kept[:, :j]).any(-1) if j else torch.zeros_like(valid[:, 0])
        kept[:, j] = valid[:, j] & ~clash & (n_kept < keep)
        n_kept += kept[:, j]
    return kept


class _Slots:
    """[n_latents, width] of examples: a score to select by, and where each example sits."""

    def __init__(self, n_latents: int, width: int, window: int, largest: bool):
        self.largest = largest
        fill = NEG if largest else float("inf")
        self.score = torch.full((n_latents, width), fill)
        self.value = torch.zeros(n_latents, width)
        self.token = torch.full((n_latents, width), -1, dtype=torch.long)
        self.start = torch.zeros(n_latents, width, dtype=torch.long)
        self.stop = torch.zeros(n_latents, width, dtype=torch.long)
        self.layer = torch.full((n_latents, width), -1, dtype=torch.long)
        self.acts = torch.zeros(n_latents, width, window, dtype=torch.float16)
        self.window = window

    def merge(self, batch: Batch, cand_latents: Tensor, cand_entries: Tensor, cand_score: Tensor) -> None:
        """Merge candidates (entries of `batch`, at most `width` per latent, any order) into the slots."""
        n_latents, width = self.score.shape
        order, rank, _ = grouped(cand_latents, cand_score, n_latents, self.largest)
        order, rank = order[rank < width], rank[rank < width]
        lat, ent = cand_latents[order], cand_entries[order]
        fill = NEG if self.largest else float("inf")
        new_score = torch.full((n_latents, width), fill)
        new_score[lat, rank] = cand_score[order]
        both = torch.cat([self.score, new_score], 1)
        # a stable sort, not topk: equal activations stay in store order (older slots, then this batch's by row)
        best = torch.sort(both, dim=1, descending=self.largest, stable=True).indices[:, :width]
        from_new = best >= width
        # entry of each new candidate, by (latent, rank)
        new_entry = torch.full((n_latents, width), -1, dtype=torch.long)
        new_entry[lat, rank] = ent
        self.score = both.gather(1, best)
        keep_old = best.clamp_max(width - 1)
        cols = {name: getattr(self, name).gather(1, keep_old) for name in ("value", "token", "start", "stop", "layer")}
        acts = self.acts.gather(1, keep_old[:, :, None].expand(-1, -1, self.window))
        g, s = from_new.nonzero(as_tuple=True)
        e = new_entry[g, (best[g, s] - width)]
        rows = batch.rows[e]
        w0, w1 = batch.win_start[rows], batch.win_stop[rows]
        cols["value"][g, s] = batch.values[e]
        cols["token"][g, s] = batch.offset + rows
        cols["start"][g, s] = batch.offset + w0
        cols["stop"][g, s] = batch.offset + w1
        cols["layer"][g, s] = batch.layers[e]
        acts[g, s] = window_acts(batch.dense, batch.latents[e], w0, w1, self.window)
        for name, col in cols.items():
            setattr(self, name, col)
        self.acts = acts


class TopTable(_Slots):
    """Each latent's `width` largest activations, no two windows overlapping."""

    def __init__(self, n_latents: int, width: int, window: int):
        super().__init__(n_latents, width, window, largest=True)

    def add(self, batch: Batch) -> None:
        n_latents, width = self.score.shape
        order, rank, counts = grouped(batch.latents, batch.values, n_latents, descending=True)
        todo = counts > 0
        depth = 2 * width
        picked: list[Tensor] = []
        while bool(todo.any()):
            # candidates of the latents still to do: their `depth` largest entries
            sel = todo[batch.latents[order]] & (rank < depth)
            ent, r = order[sel], rank[sel]
            lat = batch.latents[ent]
            rows_of = torch.full((n_latents,), -1, dtype=torch.long)
            ids = todo.nonzero().squeeze(1)
            rows_of[ids] = torch.arange(ids.numel())
            g = rows_of[lat]
            m = int(r.max()) + 1
            value = torch.full((ids.numel(), m), NEG)
            start = torch.zeros(ids.numel(), m, dtype=torch.long)
            stop = torch.zeros(ids.numel(), m, dtype=torch.long)
            entry = torch.full((ids.numel(), m), -1, dtype=torch.long)
            rows = batch.rows[ent]
            value[g, r], start[g, r], stop[g, r], entry[g, r] = batch.values[ent], batch.win_start[rows], batch.win_stop[rows], ent
            kept = greedy_nms(value, start, stop, width)
            # exact once `width` are kept or every entry of the latent was a candidate
            done = (kept.sum(1) >= width) | (counts[ids] <= depth)
            picked.append(entry[kept & done[:, None]])
            todo[ids[done]] = False
            depth *= 4
        ent = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)
        self.merge(batch, batch.latents[ent], ent, batch.values[ent])


class SampleTable(_Slots):
    """A uniform sample of `width` of each latent's activations (the smallest random keys: a
    bottom-k sketch, which merges batch by batch into the same sample a single pass would draw)."""

    def __init__(self, n_latents: int, width: int, window: int, generator: torch.Generator):
        super().__init__(n_latents, width, window, largest=False)
        self.generator = generator

    def add(self, batch: Batch) -> None:
        keys = torch.rand(batch.values.numel(), generator=self.generator)
        n_latents, width = self.score.shape
        order, rank, _ = grouped(batch.latents, keys, n_latents, descending=False)
        ent = order[rank < width]
        self.merge(batch, batch.latents[ent], ent, keys[ent])


class NegativeTable:
    """Per latent, `width` windows where it is zero at every token, drawn uniformly from `per_batch`
    random windows of each batch (smallest random keys)."""

    def __init__(self, n_latents: int, width: int, per_batch: int, generator: torch.Generator):
        self.key = torch.full((n_latents, width), float("inf"))
        self.start = torch.zeros(n_latents, width, dtype=torch.long)
        self.stop = torch.zeros(n_latents, width, dtype=torch.long)
        self.per_batch = per_batch
        self.generator = generator

    def add(self, batch: Batch, candidates: Tensor) -> None:
        """candidates: [m] rows that may centre a window (the non-special ones)."""
        if candidates.numel() == 0:
            return
        pick = candidates[torch.randint(candidates.numel(), (self.per_batch,), generator=self.generator)]
        w0, w1 = batch.win_start[pick], batch.win_stop[pick]
        width = int((w1 - w0).max())
        offs = torch.arange(width)
        rows = (w0[:, None] + offs).clamp_max(batch.dense.shape[0] - 1)
        inside = offs < (w1 - w0)[:, None]
        peak = torch.where(inside[:, :, None], batch.dense[rows], 0).amax(1)  # [per_batch, n_latents]
        keys = torch.rand(peak.shape, generator=self.generator).masked_fill(peak > 0, float("inf")).T
        n = self.key.shape[1]
        both = torch.cat([self.key, keys], 1)
        best = both.topk(n, dim=1, largest=False).indices
        starts = torch.cat([self.start, (batch.offset + w0).expand(self.key.shape[0], -1)], 1)
        stops = torch.cat([self.stop, (batch.offset + w1).expand(self.key.shape[0], -1)], 1)
        self.key, self.start, self.stop = both.gather(1, best), starts.gather(1, best), stops.gather(1, best)


class PaperTable:
    """The RouteSAE paper's rule: per latent, its activations above `threshold` grouped by canonical
    (lower-cased) token, the `per_token` largest of each group kept; a latent with more than
    `max_distinct` groups is dropped for good."""

    def __init__(self, n_latents: int, canon: Tensor, threshold: float, per_token: int, max_distinct: int):
        self.canon = canon
        self.n_canon = int(canon.max()) + 1
        self.threshold, self.per_token, self.max_distinct = threshold, per_token, max_distinct
        self.dropped = torch.zeros(n_latents, dtype=torch.bool)
        self.distinct = torch.zeros(n_latents, dtype=torch.long)
        self.active = torch.zeros(n_latents, dtype=torch.bool)
        self.key = torch.zeros(0, dtype=torch.long)
        self.value = torch.zeros(0)
        self.token = torch.zeros(0, dtype=torch.long)
        self.layer = torch.zeros(0, dtype=torch.long)

    def add(self, batch: Batch, token_ids: Tensor) -> None:
        """token_ids: [n] the batch's token ids."""
        sel = batch.values > self.threshold
        lat = batch.latents[sel]
        self.active[lat] = True
        sel[sel.clone()] = ~self.dropped[lat]
        rows = batch.rows[sel]
        key = torch.cat([self.key, batch.latents[sel] * self.n_canon + self.canon[token_ids[rows]]])
        value = torch.cat([self.value, batch.values[sel]])
        token = torch.cat([self.token, batch.offset + rows])
        layer = torch.cat([self.layer, batch.layers[sel]])
        n_latents = self.dropped.numel()
        order = torch.sort(value, descending=True, stable=True).indices
        order = order[torch.sort(key[order], stable=True).indices]
        k = key[order]
        first = torch.ones_like(k, dtype=torch.bool)
        first[1:] = k[1:] != k[:-1]
        group = torch.cumsum(first, 0) - 1
        rank = torch.arange(k.numel()) - torch.nonzero(first).squeeze(1)[group]
        distinct = torch.bincount(k[first] // self.n_canon, minlength=n_latents)
        newly = distinct > self.max_distinct
        self.distinct = torch.where(self.dropped, self.distinct, distinct.clamp_max(self.max_distinct + 1))
        self.dropped |= newly
        keep = (rank < self.per_token) & ~self.dropped[k // self.n_canon]
        order = order[keep]
        self.key, self.value, self.token, self.layer = key[order], value[order], token[order], layer[order]

    def contexts(self, latent: int) -> list[tuple[float, int, int]]:
        """(activation, token, layer) of a kept latent's contexts, largest first ([] if dropped)."""
        if bool(self.dropped[latent]):
            return []
        mine = (self.key // self.n_canon) == latent
        order = torch.sort(self.value[mine], descending=True, stable=True).indices
        return list(zip(self.value[mine][order].tolist(), self.token[mine][order].tolist(),
                        self.layer[mine][order].tolist()))
