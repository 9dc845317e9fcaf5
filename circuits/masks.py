"""Learned binary masks over SAE latents (Nainani et al.): one logit per (position, latent) of each
SAE, or per latent with shared positions, started all on; soft mask sigmoid(beta * logit) with beta
annealed from 1 to `beta_max` over training; Adam on the logits alone.

Loss per batch: |mean m(M) - mean m(masked)| + lambda * (sum of mask values, averaged over the
SAEs). The penalty is NOT normalized by the number of nodes (as in the reference), so a lambda
means the same price per latent whatever the SAEs' widths. The circuit is logit > 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from routesae.circuits.splice import CircuitModel, Means, PairBatch
from torch import Tensor


@dataclass
class MaskConfig:
    """How the masks are trained (one penalty)."""

    lam: float = 0.05
    """Penalty per unit of mask value (summed over nodes, averaged over SAEs)."""
    steps: int = 200
    """Adam steps (batches cycle in a seeded order)."""
    lr: float = 0.1
    """Adam's learning rate on the mask logits."""
    init: float = 1.0
    """Starting logit of every node (positive: all on)."""
    beta_max: float = 200.0
    """beta at the last step; beta = beta_max ** (step / (steps - 1)), from 1."""
    shared_positions: bool = False
    """One logit per latent shared by every position, instead of one per (position, latent)."""
    seed: int = 0
    """Seed of the batch order."""


class MaskResult(NamedTuple):
    """Trained masks of one penalty."""

    logits: dict[int, Tensor]
    """layer -> [P or 1, n_latents] the trained logits."""
    circuit: dict[int, Tensor]
    """layer -> [P or 1, n_latents] bool, logit > 0."""
    n_nodes: int
    """Nodes in the circuit."""
    losses: list[float]
    """Loss per step."""


def beta_at(step: int, steps: int, beta_max: float) -> float:
    return float(beta_max ** (step / max(steps - 1, 1)))


def soft_masks(logits: dict[int, Tensor], beta: float) -> dict[int, Tensor]:
    return {layer: torch.sigmoid(beta * t) for layer, t in logits.items()}


def hard_masks(circuit: dict[int, Tensor]) -> dict[int, Tensor]:
    return {layer: c.float() for layer, c in circuit.items()}


def init_logits(cm: CircuitModel, n_pos: int, cfg: MaskConfig) -> dict[int, Tensor]:
    rows = 1 if cfg.shared_positions else n_pos
    return {layer: torch.full((rows, n), float(cfg.init), device=cm.device, requires_grad=True)
            for layer, n in cm.n_latents.items()}


def penalty(masks: dict[int, Tensor]) -> Tensor:
    """Sum of mask values, averaged over the SAEs."""
    return torch.stack([m.sum() for m in masks.values()]).mean()


def train_masks(cm: CircuitModel, data: list[tuple[PairBatch, Means]], n_pos: int, cfg: MaskConfig,
                targets: list[Tensor] | None = None, tick: Callable[[float], None] | None = None) -> MaskResult:
    """Train masks on `data` (batches with their patch means); n_pos: positions the masks cover
    (the longest prompt minus BOS). targets: m(M) per batch, if already computed. tick: called
    with the loss after each step (a progress bar's update)."""
    if targets is None:
        with torch.no_grad():
            targets = [cm.metric(b, mu).mean() for b, mu in data]
    logits = init_logits(cm, n_pos, cfg)
    opt = torch.optim.Adam(list(logits.values()), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    for step in range(cfg.steps):
        if not order:
            order = torch.randperm(len(data), generator=gen).tolist()
        i = order.pop()
        batch, mu = data[i]
        masks = soft_masks(logits, beta_at(step, cfg.steps, cfg.beta_max))
        m = cm.metric(batch, mu, masks=masks).mean()
        loss = (targets[i] - m).abs() + cfg.lam * penalty(masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if tick is not None:
            tick(losses[-1])
    final = {layer: t.detach() for layer, t in logits.items()}
    circuit = {layer: t > 0 for layer, t in final.items()}
    return MaskResult(final, circuit, count_nodes(circuit), losses)


def count_nodes(circuit: dict[int, Tensor]) -> int:
    return int(sum(int(c.sum()) for c in circuit.values()))
