"""Attribution baselines over the same SAE latents as the masks: integrated gradients and
attribution patching (its one-step version), and circuits cut from them at a given node count.

IG, per SAE layer (the other SAEs spliced with every latent on): the layer's code is replaced by
z(alpha) = z_patch + alpha (z_clean - z_patch) for `steps` midpoints alpha = (i + 0.5) / steps
(exact for a metric quadratic in z), and score = (z_clean - z_patch) * mean over alpha of
d metric / d z(alpha), averaged over the prompts. z_clean and z_patch are the codes of the clean
and patch prompts with the SAEs spliced. Attribution patching: (z_clean - z_patch) * d metric / d z
at the clean run, the gradient of every layer from one backward (through the later SAEs' encoders).
Circuits keep the largest |score|.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from routesae.circuits.splice import CircuitModel, Means, PairBatch
from torch import Tensor


class Codes(NamedTuple):
    """Codes of a batch's clean and patch prompts with the SAEs spliced (all latents on)."""

    clean: dict[int, Tensor]
    """layer -> [b, s-1, n_latents]."""
    patch: dict[int, Tensor]
    """layer -> [b, s-1, n_latents]."""


@torch.no_grad()
def spliced_codes(cm: CircuitModel, batch: PairBatch, means: Means) -> Codes:
    clean: dict[int, Tensor] = {}
    patch: dict[int, Tensor] = {}
    cm.logits(batch.clean, means, capture=clean)
    cm.logits(batch.patch, means, capture=patch)
    return Codes(clean, patch)


def integrated_gradients(cm: CircuitModel, batch: PairBatch, means: Means, steps: int = 10,
                         tick: Callable[[], None] | None = None) -> dict[int, Tensor]:
    """layer -> [s-1, n_latents] IG score of each (position, latent), summed over the batch's
    prompts (divide by the prompt count for a mean); per prompt, a layer's scores sum to about
    m(clean code at that layer) - m(patch code there). tick: called after each of the
    len(cm.layers) * steps forward + backward passes (a progress bar's update)."""
    codes = spliced_codes(cm, batch, means)
    scores: dict[int, Tensor] = {}
    for layer in cm.layers:
        zc, zp = codes.clean[layer], codes.patch[layer]
        grad = torch.zeros_like(zc)
        for i in range(steps):
            alpha = (i + 0.5) / steps
            z = (zp + alpha * (zc - zp)).requires_grad_(True)
            m = cm.metric(batch, means, override={layer: z}).sum()
            (g,) = torch.autograd.grad(m, z)
            grad += g
            if tick is not None:
                tick()
        scores[layer] = ((zc - zp) * grad / steps).sum(0)
    return scores


def attribution_patching(cm: CircuitModel, batch: PairBatch, means: Means) -> dict[int, Tensor]:
    """layer -> [s-1, n_latents] (z_clean - z_patch) * gradient at the clean run, summed over prompts."""
    codes = spliced_codes(cm, batch, means)
    delta = {layer: torch.zeros_like(z, requires_grad=True) for layer, z in codes.clean.items()}
    m = cm.metric(batch, means, delta=delta).sum()
    grads = torch.autograd.grad(m, [delta[layer] for layer in cm.layers])
    return {layer: ((codes.clean[layer] - codes.patch[layer]) * g).sum(0) for layer, g in zip(cm.layers, grads)}


def accumulate(total: dict[int, Tensor] | None, scores: dict[int, Tensor], n_pos: int) -> dict[int, Tensor]:
    """Add one batch's scores (rows counted from the end, as the masks) into [n_pos, n_latents] totals."""
    if total is None:
        total = {layer: torch.zeros(n_pos, s.shape[-1], device=s.device) for layer, s in scores.items()}
    for layer, s in scores.items():
        total[layer][n_pos - s.shape[0]:] += s
    return total


def share_positions(scores: dict[int, Tensor]) -> dict[int, Tensor]:
    """Per-latent scores for shared-position masks: the sum over positions, [1, n_latents]."""
    return {layer: s.sum(0, keepdim=True) for layer, s in scores.items()}


def top_n_circuit(scores: dict[int, Tensor], n: int) -> dict[int, Tensor]:
    """The n nodes of largest |score| over every layer, as bool masks shaped like the scores
    (ties broken by the stable order of layer, then flat index)."""
    layers = sorted(scores)
    flat = torch.cat([scores[layer].abs().flatten() for layer in layers])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if n > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        keep[order[:min(n, flat.numel())]] = True
    out: dict[int, Tensor] = {}
    start = 0
    for layer in layers:
        size = scores[layer].numel()
        out[layer] = keep[start:start + size].view_as(scores[layer])
        start += size
    return out
