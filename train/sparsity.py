"""The sparsity coefficient of an SAE whose L0 is not fixed by a k (vanilla, gated, JumpReLU): a
linear warm-up from 0, then either fixed or steered toward a target L0.

The steering is a proportional-integral controller in log space (Nabeshima's Matryoshka code
steers multiplicatively too, more slowly: its budgets are millions of steps, ours thousands).
After each step past the warm-up it reads a running mean of the batches' L0 and its error
e = log(L0 / target), clipped to [-1, 1]:

- integral: log(coef) moves by `STEER_RATE * e`; this is the part that finds the coefficient the
  target needs, which may be several times the starting one;
- proportional: the coefficient applied is coef * exp(`PROPORTIONAL` * e). The L0 does not answer
  the coefficient at once but through the weights it moves, so to it an integral alone is an
  integral of an integral, and it oscillates (vanilla swung 5 <-> 70 over ~120 steps); the
  proportional part damps that.

The clip on e is the anti-windup: however far the L0 is (the first steps after the warm-up, the
end where the learning rate decays to 0 and the L0 can no longer follow), the coefficient moves by
at most `STEER_RATE` in log per step. In log space the gains mean the same at any target and any
scale of the coefficient.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

STEER_RATE = 0.05
"""Integral gain: change of log(coef) per step at a log L0 error of 1 (or more)."""
PROPORTIONAL = 0.5
"""Proportional gain: log(applied coef / coef) per unit of log L0 error."""
SMOOTHING = 0.8
"""Weight of the past in the running L0 the steering reads: a ReLU code's L0 answers the
coefficient steeply and late, and steering on single batches made vanilla's L0 swing 2 -> 156."""


@dataclass
class SparsityControl:
    """One SAE's sparsity coefficient over training."""

    coef: float
    """The coefficient after the warm-up: when steered, its integral part (`value` applies the
    proportional part on top)."""
    warmup: float
    """Fraction of the budget over which the coefficient ramps up linearly from 0."""
    target_l0: float | None = None
    """Active latents per token to steer toward; None keeps coef fixed."""

    def value(self, progress: float) -> float:
        """The coefficient applied at `progress` (fraction of the budget trained)."""
        coef = self.coef * math.exp(PROPORTIONAL * self.error) if self.error else self.coef
        if self.warmup > 0 and progress < self.warmup:
            return coef * progress / self.warmup
        return coef

    l0_average: float | None = None
    """Running mean of the batches' L0 that the steering reads (None before the first step past the warm-up)."""
    error: float = 0.0
    """Clipped log(l0_average / target_l0) of the last update (0 before the first, or unsteered)."""

    def update(self, l0: float, progress: float) -> None:
        """After a step at `progress` whose batch had mean L0 `l0`."""
        if self.target_l0 is None or progress < self.warmup or not math.isfinite(l0):
            return
        avg = l0 if self.l0_average is None else SMOOTHING * self.l0_average + (1 - SMOOTHING) * l0
        self.l0_average = avg
        # an L0 of 0 (every latent off) reads as the largest error down, not as log(0)
        ratio = avg / self.target_l0
        self.error = max(-1.0, min(1.0, math.log(ratio))) if ratio > 0 else -1.0
        self.coef *= math.exp(STEER_RATE * self.error)

    def state(self) -> dict[str, Any]:
        return asdict(self)
