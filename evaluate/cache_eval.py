"""Metrics straight from the activation store, no LLM: NormMSE, FVU, L0, dead latents, latent
firing frequencies and, for RouteSAE, how tokens are routed over the layers.

Special positions (BOS/EOS/pad) are left out, as in training."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from routesae.evaluate.metrics import VarianceAccumulator, normmse_per_token
from routesae.evaluate.targets import Target
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


class _Totals:
    def __init__(self, target: Target, n_latents: int, d_model: int, device: torch.device):
        self.n = 0
        self.normmse = 0.0
        self.l0 = 0.0
        self.fired = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.var = VarianceAccumulator(d_model, device=device)
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
        fvu = self.var.fvu() if target.can_splice else math.nan
        nan = math.nan
        return CacheResult(self.n, self.normmse / n if self.n else nan, fvu, self.l0 / n if self.n else nan,
                           dead / len(freq), hist, routing)


def evaluate_cache(
    cache: Cache,
    targets: list[Target],
    start: int,
    stop: int,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> list[CacheResult]:
    """Run every target over store tokens [start, stop); each batch of activations is read once."""
    layers = sorted({layer for t in targets for layer in t.layers})
    totals = [_Totals(t, t.config.n_latents, t.config.d_model, t.device) for t in targets]
    bar = tqdm(total=stop - start, unit="tok", unit_scale=True, desc="eval (cache)", disable=not progress,
               dynamic_ncols=True)
    for a in range(start, stop, batch_tokens):
        b = min(a + batch_tokens, stop)
        keep = ~cache.special(a, b)
        ids = torch.arange(a, b)[keep]
        acts = {layer: cache.acts(layer, a, b)[keep] for layer in layers}
        for target, tot in zip(targets, totals):
            out = target.cache_batch(acts, ids)
            tot.n += int(ids.numel())
            tot.normmse += float(normmse_per_token(out.coder_in, out.coder_out).double().sum())
            firing = out.values > 0
            tot.l0 += float(firing.sum())
            tot.fired.index_add_(0, out.indices[firing], torch.ones(int(firing.sum()), dtype=torch.float64,
                                                                   device=tot.fired.device))
            if out.x is not None:
                tot.var.add(out.x, out.x_hat)
            if out.layer_index is not None:
                tot.route_tokens += torch.bincount(out.layer_index, minlength=len(target.layers)).double()
                tot.route_weight += out.probs.double().sum(0)
                chosen = out.probs.gather(1, out.layer_index[:, None]).squeeze(1).double()
                tot.route_chosen.index_add_(0, out.layer_index, chosen)
        bar.update(b - a)
    bar.close()
    return [tot.result(t) for t, tot in zip(targets, totals)]
