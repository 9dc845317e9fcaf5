"""The sparsity coefficient of an SAE whose L0 is not fixed by a k (vanilla, gated, JumpReLU): a
linear warm-up from 0, then either fixed or steered toward a target L0.

The steering is a multiplicative controller on the coefficient (as Nabeshima's Matryoshka code
does, faster here because budgets are thousands of steps, not millions): after each step past the
warm-up, log(coef) moves by `STEER_RATE` times the relative L0 error of the batch, clipped to
[-1, 1]. Too much L0 raises the coefficient, too little lowers it; where the learning rate decays
to 0 at the end the weights, and so the L0, settle where the controller last had them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

STEER_RATE = 0.01
"""Change of log(coef) per step at a relative L0 error of 1 (or more)."""
SMOOTHING = 0.9
"""Weight of the past in the running L0 the steering reads: a ReLU code's L0 answers the
coefficient steeply and late, and steering on single batches made vanilla's L0 swing 2 -> 156."""


@dataclass
class SparsityControl:
    """One SAE's sparsity coefficient over training."""

    coef: float
    """The coefficient after the warm-up (steered, when target_l0 is set)."""
    warmup: float
    """Fraction of the budget over which the coefficient ramps up linearly from 0."""
    target_l0: float | None = None
    """Active latents per token to steer toward; None keeps coef fixed."""

    def value(self, progress: float) -> float:
        """The coefficient at `progress` (fraction of the budget trained)."""
        if self.warmup > 0 and progress < self.warmup:
            return self.coef * progress / self.warmup
        return self.coef

    l0_average: float | None = None
    """Running mean of the batches' L0 that the steering reads (None before the first step past the warm-up)."""

    def update(self, l0: float, progress: float) -> None:
        """After a step at `progress` whose batch had mean L0 `l0`."""
        if self.target_l0 is None or progress < self.warmup or not math.isfinite(l0):
            return
        avg = l0 if self.l0_average is None else SMOOTHING * self.l0_average + (1 - SMOOTHING) * l0
        self.l0_average = avg
        error = max(-1.0, min(1.0, avg / self.target_l0 - 1))
        self.coef *= math.exp(STEER_RATE * error)

    def state(self) -> dict[str, Any]:
        return asdict(self)
