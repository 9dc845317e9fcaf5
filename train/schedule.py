"""Learning-rate schedule: linear warm-up, constant, linear decay to 0 (the RouteSAE paper's
5% / 75% / 20%). Driven by the fraction of the token budget, so a short last batch or a
budget that is not a whole number of batches needs no special case."""

from __future__ import annotations


def lr_factor(progress: float, warmup: float = 0.05, decay: float = 0.2) -> float:
    """Multiplier of the peak learning rate at `progress` in [0, 1] of the budget.

    The trainer evaluates it at the middle of each step's tokens, so neither the first nor the
    last step is wasted at a factor of exactly 0."""
    if not (0 <= warmup and 0 <= decay and warmup + decay <= 1):
        raise ValueError(f"warm-up {warmup} and decay {decay} must be fractions summing to at most 1")
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    if decay > 0 and progress > 1 - decay:
        return (1 - progress) / decay
    return 1.0
