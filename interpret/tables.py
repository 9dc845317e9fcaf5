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
    code_keys: Tensor
    """[E] latent * n + row of every entry, sorted: the code as a sorted sparse array (no dense copy)."""
    code_values: Tensor
    """[E] the value of each key."""

    def windows(self, latents: Tensor, start: Tensor, stop: Tensor, width: int) -> Tensor:
        """[C] windows of rows [start, stop) (at most `width` long) of latents -> [C, width] values,
        0 where the latent does not fire and past the window. A latent's entries sit in row order in
        the sorted keys, so one search per window finds them all."""
        n, e = self.win_start.numel(), self.code_keys.numel()
        out = torch.zeros(latents.numel(), width)
        if e == 0:
            return out
        base = latents * n + start
        offs = torch.arange(width)
        idx = torch.searchsorted(self.code_keys, base)[:, None] + offs
        pos = self.code_keys[idx.clamp_max(e - 1)] - base[:, None]  # row within the window
        ok = (idx < e) & (pos >= 0) & (pos < (stop - start)[:, None])
        vals = torch.where(ok, self.code_values[idx.clamp_max(e - 1)], 0.0)
        return out.scatter_add_(1, torch.where(ok, pos, 0), vals)

    def fires_in(self, latents: Tensor, start: Tensor, stop: Tensor) -> Tensor:
        """[C] whether each latent fires anywhere in its window of rows [start, stop)."""
        n, e = self.win_start.numel(), self.code_keys.numel()
        if e == 0:
            return torch.zeros(latents.numel(), dtype=torch.bool)
        idx = torch.searchsorted(self.code_keys, latents * n + start)
        return (idx < e) & (self.code_keys[idx.clamp_max(e - 1)] < latents * n + stop)


def sorted_code(rows: Tensor, latents: Tensor, values: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """-> (code_keys, code_values) for a Batch of n rows."""
    key = latents * n + rows
    order = torch.sort(key).indices
    return key[order], values[order]


def grouped(groups: Tensor, key: Tensor, n_groups: int, descending: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Entries sorted by group, then by key (>= 0), equal keys in entry order -> (order, rank within
    its group, entries per group). One sort of an int64 (group, key) composite: a non-negative
    float32's bits order as the float does."""
    bits = key.float().contiguous().view(torch.int32).long()
    if descending:
        bits = (1 << 31) - 1 - bits
    order = torch.sort(groups * (1 << 32) + bits, stable=True).indices
    g = groups[order]
    counts = torch.bincount(g, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    return order, torch.arange(order.numel()) - starts[g], counts


def window_acts(batch: Batch, latents: Tensor, start: Tensor, stop: Tensor, width: int) -> Tensor:
    """[C] windows of rows [start, stop) of latents -> [C, width] float16 activations, 0-padded."""
    return batch.windows(latents, start, stop, width).half()


def greedy_nms(value: Tensor, start: Tensor, stop: Tensor, keep: int) -> Tensor:
    """[G, M] candidates per group, by value descending (-inf: none) -> [G, M] bool, the first `keep`
    that overlap no larger one kept before them: greedy non-maximum suppression of windows.

    Computed as the fixed point of kept_j = valid_j and no kept i < j overlaps j, iterated for all j
    at once: the greedy answer is its only fixed point, and each round settles at least the next
    candidate in order, so it ends in at most M rounds (in practice a handful)."""
    valid = value > NEG
    m = value.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool).tril(-1)  # [j, i]: i comes before j
    prior = (start[:, :, None] < stop[:, None, :]) & (start[:, None, :] < stop[:, :, None]) & earlier
    kept = valid.clone()
    clash = prior.any(2).any(1).nonzero().squeeze(1)  # groups where some windows overlap at all
    prior, valid_c, kept_c = prior[clash], valid[clash], valid[clash]
    for _ in range(m):
        nxt = valid_c & ~(prior & kept_c[:, None, :]).any(-1)
        if torch.equal(nxt, kept_c):
            break
        kept_c = nxt
    kept[clash] = kept_c
    return kept & (torch.cumsum(kept, 1) <= keep)


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

    def may_enter(self, latents: Tensor, scores: Tensor) -> Tensor:
        """[E] whether each candidate beats its latent's worst slot (strictly: on equal scores the
        older example stays), so it may enter; the others need no further look."""
        if self.largest:
            return scores > self.score.amin(1)[latents]
        return scores < self.score.amax(1)[latents]

    def merge(self, batch: Batch, cand_latents: Tensor, cand_entries: Tensor, cand_score: Tensor) -> None:
        """Merge candidates (entries of `batch`, any number per latent, any order) into the slots.
        Slots are not kept in order: the chosen new examples take the slots of the evicted ones, so
        only those are written (their windows' values included); latents without a candidate are
        not touched at all."""
        if cand_latents.numel() == 0:
            return
        width = self.score.shape[1]
        touched, local = torch.unique(cand_latents, return_inverse=True)
        n = touched.numel()
        order, rank, _ = grouped(local, cand_score, n, self.largest)
        order, rank = order[rank < width], rank[rank < width]
        lat, ent = local[order], cand_entries[order]
        fill = NEG if self.largest else float("inf")
        new_score = torch.full((n, width), fill)
        new_score[lat, rank] = cand_score[order]
        new_entry = torch.full((n, width), -1, dtype=torch.long)
        new_entry[lat, rank] = ent
        new_token = torch.full((n, width), torch.iinfo(torch.long).max)
        new_token[lat, rank] = batch.offset + batch.rows[ent]
        # by score, equal scores in store order (empty old slots first among the empty)
        both = torch.cat([self.score[touched], new_score], 1)
        by_token = torch.sort(torch.cat([self.token[touched], new_token], 1), dim=1, stable=True).indices
        best = by_token.gather(1, torch.sort(both.gather(1, by_token), dim=1, descending=self.largest,
                                             stable=True).indices[:, :width])
        chosen = torch.zeros(n, 2 * width, dtype=torch.bool).scatter_(1, best, True)
        g, slot = (~chosen[:, :width]).nonzero(as_tuple=True)  # row-major: grouped by latent, as below
        g2, col = chosen[:, width:].nonzero(as_tuple=True)
        assert torch.equal(g, g2)
        e = new_entry[g2, col]
        real = e >= 0
        g, slot, col, e = g[real], slot[real], col[real], e[real]
        rows = batch.rows[e]
        w0, w1 = batch.win_start[rows], batch.win_stop[rows]
        at = touched[g]
        self.score[at, slot] = new_score[g, col]
        self.value[at, slot] = batch.values[e]
        self.token[at, slot] = batch.offset + rows
        self.start[at, slot] = batch.offset + w0
        self.stop[at, slot] = batch.offset + w1
        self.layer[at, slot] = batch.layers[e]
        self.acts[at, slot] = window_acts(batch, batch.latents[e], w0, w1, self.window)

    def ordered(self) -> Tensor:
        """[n_latents, width] slot indices by score (largest first for top tables), ties in store order."""
        by_token = torch.sort(self.token, dim=1, stable=True).indices
        return by_token.gather(1, torch.sort(self.score.gather(1, by_token), dim=1, descending=self.largest,
                                             stable=True).indices)


class TopTable(_Slots):
    """Each latent's `width` largest activations, no two windows overlapping."""

    def __init__(self, n_latents: int, width: int, window: int):
        super().__init__(n_latents, width, window, largest=True)

    def add(self, batch: Batch) -> None:
        n_latents, width = self.score.shape
        # an entry at or below its latent's worst slot can neither enter nor suppress one that can
        cand = self.may_enter(batch.latents, batch.values).nonzero().squeeze(1)
        latents, values = batch.latents[cand], batch.values[cand]
        order, rank, counts = grouped(latents, values, n_latents, descending=True)
        todo = counts > 0
        depth = 2 * width
        picked: list[Tensor] = []
        while bool(todo.any()):
            # candidates of the latents still to do: their `depth` largest entries
            sel = todo[latents[order]] & (rank < depth)
            ent, r = cand[order[sel]], rank[sel]
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
        ent = self.may_enter(batch.latents, keys).nonzero().squeeze(1)
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
        pick = candidates[torch.randperm(candidates.numel(), generator=self.generator)[: self.per_batch]]
        w0, w1 = batch.win_start[pick], batch.win_stop[pick]
        keys = torch.rand(self.key.shape[0], pick.numel(), generator=self.generator)
        # only (latent, window) pairs whose key would enter need the zero check
        lat, q = (keys < self.key.amax(1, keepdim=True)).nonzero(as_tuple=True)
        if lat.numel() == 0:
            return
        zero = ~batch.fires_in(lat, w0[q], w1[q])
        lat, q = lat[zero], q[zero]
        if lat.numel() == 0:
            return
        touched, local = torch.unique(lat, return_inverse=True)
        new = torch.full((touched.numel(), pick.numel()), float("inf"))
        new[local, q] = keys[lat, q]
        n = self.key.shape[1]
        both = torch.cat([self.key[touched], new], 1)
        best = both.topk(n, dim=1, largest=False).indices
        starts = torch.cat([self.start[touched], (batch.offset + w0).expand(touched.numel(), -1)], 1)
        stops = torch.cat([self.stop[touched], (batch.offset + w1).expand(touched.numel(), -1)], 1)
        self.key[touched], self.start[touched], self.stop[touched] = (both.gather(1, best), starts.gather(1, best),
                                                                      stops.gather(1, best))


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
