"""Metrics of a circuit (binary masks over the SAE latents) on a split of the task.

m(X): mean logit difference over the split's prompts with the nodes of X on and every other node
ablated. M: every node on (the model with SAEs spliced); empty: every node off.
- faithfulness (plain, Nainani): m(C) / m(M);
- faithfulness (baselined, Marks): (m(C) - m(empty)) / (m(M) - m(empty));
- completeness (baselined): (m(M \\ C) - m(empty)) / (m(M) - m(empty)), C removed from the full
  model (near 0: C holds all that matters; near 1: what is outside C does the job too);
- stability of a sweep: for circuits sorted by size, the fraction of each one's nodes that the
  next larger one contains (1: nested).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
from routesae.circuits.splice import CircuitModel, Means, PairBatch
from torch import Tensor


Tick = Callable[[], None] | None
"""Called after each forward (a progress bar's update), or None."""


class Baselines(NamedTuple):
    """m(M) and m(empty) of a split."""

    full: float
    empty: float


class CircuitScores(NamedTuple):
    """A circuit's metrics on one split."""

    n_nodes: int
    m_circuit: float
    m_complement: float
    faithfulness: float
    faithfulness_baselined: float
    completeness: float


@torch.no_grad()
def mean_metric(cm: CircuitModel, data: list[tuple[PairBatch, Means]], masks: dict[int, Tensor],
                tick: Tick = None) -> float:
    """Mean logit difference over every prompt of `data` with these masks (tick: after each batch)."""
    total, count = 0.0, 0
    for batch, mu in data:
        m = cm.metric(batch, mu, masks=masks)
        total += float(m.sum())
        count += m.numel()
        if tick is not None:
            tick()
    return total / max(count, 1)


def baselines(cm: CircuitModel, data: list[tuple[PairBatch, Means]], n_pos: int, rows: int,
              tick: Tick = None) -> Baselines:
    """m(M) and m(empty); rows: the masks' row count (n_pos, or 1 with shared positions).
    2 * len(data) forwards (tick: after each)."""
    return Baselines(mean_metric(cm, data, cm.full_masks(rows, 1.0), tick),
                     mean_metric(cm, data, cm.full_masks(rows, 0.0), tick))


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


def score_circuit(cm: CircuitModel, data: list[tuple[PairBatch, Means]], circuit: dict[int, Tensor],
                  base: Baselines, tick: Tick = None) -> CircuitScores:
    """The circuit's metrics on `data`: 2 * len(data) forwards (tick: after each)."""
    on = {layer: c.float() for layer, c in circuit.items()}
    off = {layer: 1.0 - c.float() for layer, c in circuit.items()}
    m_c, m_out = mean_metric(cm, data, on, tick), mean_metric(cm, data, off, tick)
    span = base.full - base.empty
    return CircuitScores(
        n_nodes=int(sum(int(c.sum()) for c in circuit.values())),
        m_circuit=m_c,
        m_complement=m_out,
        faithfulness=_ratio(m_c, base.full),
        faithfulness_baselined=_ratio(m_c - base.empty, span),
        completeness=_ratio(m_out - base.empty, span),
    )


def nested_fraction(small: dict[int, Tensor], large: dict[int, Tensor]) -> float:
    """Fraction of `small`'s nodes that `large` contains (1.0 for an empty `small`)."""
    n = sum(int(c.sum()) for c in small.values())
    if n == 0:
        return 1.0
    both = sum(int((small[layer] & large[layer]).sum()) for layer in small)
    return both / n


def stability(circuits: list[dict[int, Tensor]]) -> list[float]:
    """For circuits sorted by node count: nested_fraction of each in the next larger (len - 1 values)."""
    ordered = sorted(circuits, key=lambda c: sum(int(v.sum()) for v in c.values()))
    return [nested_fraction(a, b) for a, b in itertools.pairwise(ordered)]
