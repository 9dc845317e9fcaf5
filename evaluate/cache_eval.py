"""Metrics straight from the activation store, no LLM: NormMSE, FVU, L0, dead latents, latent
firing frequencies and, for RouteSAE, how tokens are routed over the layers; and the additive sums
of these per store context (evaluate.per_context).

Special positions (BOS/EOS/pad) are left out, as in training."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from routesae.cpu_memory import ResidentCap
from routesae.evaluate.metrics import ContextMoments, normmse_per_token, run_sums
from routesae.evaluate.per_context import CACHE_METRICS
from routesae.evaluate.targets import CacheBatch, Target
from routesae.store.zarr_store import Cache

# log10 firing-frequency bins of the histogram; a latent that never fired is counted apart as dead
HIST_EDGES = np.linspace(-8.0, 0.0, 33)


class FiringHistogram(NamedTuple):
    """How often latents fire: counts of log10(frequency) in bins, the never-firing apart."""

    edges: list[float]
    """Bin edges in log10 of the fraction of tokens a latent fires on (len(counts) + 1)."""
    counts: list[int]
    """Latents per bin (frequencies below the first edge count in the first bin)."""
    dead: int
    """Latents that fired on none of the evaluated tokens."""


class RoutingDistribution(NamedTuple):
    """Where a RouteSAE (or a baseline routing) sends tokens."""

    layers: list[int]
    """The routed hidden_states indices."""
    tokens: list[int]
    """Tokens per layer under hard routing (arg-max)."""
    fraction: list[float]
    """The same as fractions of the evaluated tokens."""
    mean_weight: list[float]
    """Mean routing weight (softmax probability) of each layer over all the tokens."""
    chosen_weight: list[float]
    """Mean weight p of the chosen layer over the tokens routed to it (NaN where none): what hard
    routing scales the layer by (1/n for the uniform baseline, 1 for random-layer)."""
    mode: str
    """The SAE's routing: 'hard' (the chosen layer alone, times p) or 'soft' (the mix of all)."""


class CacheResult(NamedTuple):
    """One target's metrics from the store."""

    n_tokens: int
    """Non-special tokens evaluated."""
    normmse: float
    """Mean ||x_hat - x||^2 / ||x||^2 in the coder's space, as the training loss (for RouteSAE the
    input is p * x_norm: not comparable across architectures)."""
    fvu: float
    """Fraction of variance unexplained in model space, of the activations a splice replaces:
    sum_d Var(x_d - x_hat_d) / sum_d Var(x_d) (NaN for soft routing)."""
    l0: float
    """Mean number of firing latents per token."""
    dead_fraction: float
    """Fraction of latents that fired on none of the evaluated tokens."""
    firing: FiringHistogram
    routing: RoutingDistribution | None
    """RouteSAE only."""


class CacheRun(NamedTuple):
    """The cache metrics of the targets, and their sums per context."""

    results: list[CacheResult]
    """One CacheResult per target."""
    contexts: np.ndarray
    """int64 [n_contexts]: the store contexts (token offset // context_len) the tokens lay in."""
    per_context: list[dict[str, np.ndarray]]
    """Per target: per_context.CACHE_METRICS name -> float64 [n_contexts] (see evaluate.per_context)."""


class _Totals:
    def __init__(self, target: Target, n_latents: int, d_model: int, device: torch.device, n_contexts: int):
        self.context_sums = np.zeros((3, n_contexts))
        """Per context: tokens, firing latents, NormMSE summed."""
        self.moments = ContextMoments(n_contexts, d_model) if target.can_splice else None
        """FVU's sums per context (where FVU is measured: one layer per token); FVU is their ratio."""
        self.n = 0
        self.normmse = 0.0
        self.l0 = 0.0
        self.fired = torch.zeros(n_latents, dtype=torch.float64, device=device)
        n_layers = len(target.layers) if target.routed else 0
        self.route_tokens = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.route_weight = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.route_chosen = torch.zeros(n_layers, dtype=torch.float64, device=device)

    def result(self, target: Target) -> CacheResult:
        n = max(self.n, 1)
        freq = (self.fired / n).cpu().numpy()
        dead = int((freq == 0).sum())
        live = np.log10(np.clip(freq[freq > 0], 10 ** HIST_EDGES[0], 1.0))
        counts, _ = np.histogram(live, bins=HIST_EDGES)
        hist = FiringHistogram([float(e) for e in HIST_EDGES], [int(c) for c in counts], dead)
        routing = None
        if target.routed:
            tokens = [int(t) for t in self.route_tokens.tolist()]
            chosen = [c / t if t else math.nan for c, t in zip(self.route_chosen.tolist(), tokens)]
            routing = RoutingDistribution(
                target.layers, tokens, [t / n for t in tokens], (self.route_weight / n).tolist(), chosen,
                target.config.routing,
            )
        fvu = self.moments.fvu() if self.moments is not None else math.nan
        nan = math.nan
        return CacheResult(self.n, self.normmse / n if self.n else nan, fvu, self.l0 / n if self.n else nan,
                           dead / len(freq), hist, routing)

    def add_contexts(self, out: CacheBatch, nmse: torch.Tensor, firing: torch.Tensor, counts: list[int],
                     first: int) -> None:
        """This batch's sums per context: its tokens come context by context, counts[i] of them in
        context first + i (local to the run). One float64 buffer [tokens, 4 + 2d], summed per
        context and copied to the CPU once: l0, NormMSE, ||x||^2, ||r||^2, x, r (r = x - x_hat)."""
        d = out.x.shape[-1] if self.moments is not None else 0
        cols = torch.empty(nmse.shape[0], 4 + 2 * d, dtype=torch.float64, device=nmse.device)
        cols[:, 0] = firing.sum(-1)
        cols[:, 1] = nmse
        if self.moments is not None:
            x, r = cols[:, 4 : 4 + d], cols[:, 4 + d :]
            x.copy_(out.x)
            r.copy_(out.x).sub_(out.x_hat)  # in float64, x_hat promoted as it is read
            cols[:, 2] = x.pow(2).sum(-1)
            cols[:, 3] = r.pow(2).sum(-1)
        sums = run_sums(cols, counts).cpu().numpy()
        rows = slice(first, first + len(counts))
        self.context_sums[0, rows] += counts
        self.context_sums[1:, rows] += sums[:, :2].T
        if self.moments is not None:
            self.moments.add(first, np.asarray(counts, dtype=np.float64), sums[:, 4 : 4 + d], sums[:, 4 + d :],
                             sums[:, 2], sums[:, 3])

    def context_result(self) -> dict[str, np.ndarray]:
        n, l0, nmse = self.context_sums
        if self.moments is not None:
            sse, sst = self.moments.shares()
        else:  # no FVU (soft routing): no pieces of it
            sse = sst = np.full_like(n, np.nan)
        return dict(zip(CACHE_METRICS, (n.copy(), l0.copy(), nmse.copy(), sse, sst)))


def evaluate_cache(
    cache: Cache,
    targets: list[Target],
    start: int,
    stop: int,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> list[CacheResult]:
    """Run every target over store tokens [start, stop); each batch of activations is read once."""
    return evaluate_cache_per_context(cache, targets, start, stop, batch_tokens, progress).results


def evaluate_cache_per_context(
    cache: Cache,
    targets: list[Target],
    start: int,
    stop: int,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> CacheRun:
    """evaluate_cache, with each target's sums per store context kept in the same pass."""
    ctx = cache.context_len
    first_context = start // ctx
    contexts = np.arange(first_context, -(-stop // ctx), dtype=np.int64)
    layers = sorted({layer for t in targets for layer in t.layers})
    totals = [_Totals(t, t.config.n_latents, t.config.d_model, t.device, len(contexts)) for t in targets]
    bar = tqdm(total=stop - start, unit="tok", unit_scale=True, desc="eval (cache)", disable=not progress,
               dynamic_ncols=True)
    cap = ResidentCap()  # memory bounded whatever the number of batches
    for a in range(start, stop, batch_tokens):
        b = min(a + batch_tokens, stop)
        keep = ~cache.special(a, b)
        ids = torch.arange(a, b)[keep]
        acts = {layer: cache.acts(layer, a, b)[keep] for layer in layers}
        # the contexts this batch touches, and its scored tokens in each (they come in order)
        c0, c1 = a // ctx, -(-b // ctx)
        counts = torch.bincount(ids // ctx - c0, minlength=c1 - c0).tolist()
        for target, tot in zip(targets, totals):
            out = target.cache_batch(acts, ids)
            tot.n += int(ids.numel())
            nmse = normmse_per_token(out.coder_in, out.coder_out)
            tot.normmse += float(nmse.double().sum())
            firing = out.values > 0
            tot.l0 += float(firing.sum())
            tot.fired.index_add_(0, out.indices[firing], torch.ones(int(firing.sum()), dtype=torch.float64,
                                                                   device=tot.fired.device))
            if out.layer_index is not None:
                tot.route_tokens += torch.bincount(out.layer_index, minlength=len(target.layers)).double()
                tot.route_weight += out.probs.double().sum(0)
                chosen = out.probs.gather(1, out.layer_index[:, None]).squeeze(1).double()
                tot.route_chosen.index_add_(0, out.layer_index, chosen)
            tot.add_contexts(out, nmse, firing, counts, c0 - first_context)
        bar.update(b - a)
        cap.check()
    bar.close()
    return CacheRun([tot.result(t) for t, tot in zip(targets, totals)], contexts,
                    [tot.context_result() for tot in totals])
