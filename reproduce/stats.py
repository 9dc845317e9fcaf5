"""Statistics of `routesae reproduce`: seed intervals, context bootstraps, paired differences, verdicts.

Pure numpy + scipy. Eval writes per held-out context additive sums (sse, sst, kl_sum, n_tokens, ...),
so every metric here is a ratio of sums over contexts: a bootstrap resamples contexts and recomputes
the ratio from the resampled sums, never averages per-context ratios. A `metric_fn` takes a dict of
summed arrays (all of one shape) and returns the metric elementwise in that shape, e.g.
`lambda s: s["sse"] / s["sst"]`; `RATIO_METRICS` holds the usual ones.

Random draws: contexts come from the first child of `np.random.SeedSequence(seed)`, arm A's seeds
from the second and arm B's from the third, each as `floor(uniform * n)` row by row. Uniform doubles
take one 64-bit draw each, so the result does not depend on how the resamples are chunked, and the
same `seed` gives `context_bootstrap` and a one-seed `paired_difference` the same context resamples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
from scipy import stats as scipy_stats

from routesae.errors import RouteSAEError

MetricFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]

# resamples are processed in chunks of about this many (resample x context) entries: a handful of
# 16 MB arrays at a time (under about 100 MB) however many contexts and resamples there are
_CHUNK_ELEMENTS = 1 << 21


def fvu(s: Mapping[str, np.ndarray]) -> np.ndarray:
    """Fraction of variance unexplained: sum sse / sum sst."""
    return s["sse"] / s["sst"]


def kl_per_token(s: Mapping[str, np.ndarray]) -> np.ndarray:
    """Spliced-in KL in nats per token: sum kl_sum / sum n_tokens."""
    return s["kl_sum"] / s["n_tokens"]


def l0(s: Mapping[str, np.ndarray]) -> np.ndarray:
    """Active latents per token: sum l0_sum / sum n_tokens."""
    return s["l0_sum"] / s["n_tokens"]


def loss_recovered(s: Mapping[str, np.ndarray]) -> np.ndarray:
    """1 - (CE spliced - CE clean) / (CE zero-ablated - CE clean), from summed CEs."""
    return 1.0 - (s["ce_spliced_sum"] - s["ce_clean_sum"]) / (s["ce_zero_sum"] - s["ce_clean_sum"])


RATIO_METRICS: dict[str, MetricFn] = {
    "fvu": fvu,
    "kl_per_token": kl_per_token,
    "l0": l0,
    "loss_recovered": loss_recovered,
}
"""The ratio-of-sums metrics of eval's per_context.npz, by name."""


class Interval(NamedTuple):
    """A point estimate with its interval (NaN bounds when there is none)."""

    estimate: float
    """The metric on all data (mean over seeds for `seed_interval`)."""
    low: float
    """Lower bound of the interval, NaN when there is none."""
    high: float
    """Upper bound of the interval, NaN when there is none."""
    n: int
    """Seeds (`seed_interval`) or held-out contexts (`context_bootstrap`)."""
    method: str
    """How the interval was made, for reports, e.g. "Student t over 3 seeds, 95%"."""


class Difference(NamedTuple):
    """Arm A minus arm B for one metric on the same held-out contexts."""

    estimate: float
    """Seed mean of A's metric minus seed mean of B's."""
    low: float
    """Lower bound of the interval, NaN when there is none."""
    high: float
    """Upper bound of the interval, NaN when there is none."""
    n: int
    """Held-out contexts shared by both arms."""
    n_seeds_a: int
    """Seeds (rows) of arm A."""
    n_seeds_b: int
    """Seeds (rows) of arm B."""
    mean_a: float
    """Seed mean of A's metric."""
    mean_b: float
    """Seed mean of B's metric."""
    method: str
    """How the interval was made, for reports."""


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise RouteSAEError(f"confidence level must be between 0 and 1, got {level}")


def _pct(level: float) -> str:
    return f"{100 * level:g}%"


def seed_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval:
    """Mean of one metric over seeds with a Student-t interval: mean +- t_{(1+level)/2, n-1} s / sqrt(n).

    With one seed there is no spread to estimate: NaN bounds, and the method string says so."""
    _check_level(level)
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise RouteSAEError("seed_interval needs at least one seed's value, got none")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, math.nan, math.nan, 1, "1 seed: no interval")
    half = float(scipy_stats.t.ppf((1.0 + level) / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size), f"Student t over {x.size} seeds, {_pct(level)}")


def seed_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval:
    """mean(a) - mean(b) over two sets of independent seeds, with Welch's t interval (scipy's; the
    seeds of two architectures are separate runs, so nothing pairs them). With fewer than two
    seeds on a side, or no spread on either, NaN bounds."""
    _check_level(level)
    x, y = (np.asarray(v, dtype=np.float64).ravel() for v in (a, b))
    if x.size == 0 or y.size == 0:
        raise RouteSAEError("seed_difference needs at least one seed's value on each side")
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2 or (x.std() == 0 and y.std() == 0):
        return Interval(diff, math.nan, math.nan, int(min(x.size, y.size)), "fewer than 2 seeds or no spread: no interval")
    ci = scipy_stats.ttest_ind(x, y, equal_var=False).confidence_interval(level)
    return Interval(diff, float(ci.low), float(ci.high), int(min(x.size, y.size)),
                    f"Welch t over {x.size} vs {y.size} seeds, {_pct(level)}")


def _generators(seed: int, count: int) -> list[np.random.Generator]:
    # child i of a SeedSequence is the same however many children are spawned
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(count)]


def _draw_indices(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """[rows, n] indices uniform on 0..n-1, as floor(u * n): one 64-bit draw each, chunk-invariant."""
    return np.minimum((rng.random((rows, n)) * n).astype(np.int64), n - 1)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of n contexts is drawn in each row of idx: [rows, n] float64."""
    rows = idx.shape[0]
    flat = (idx + (np.arange(rows, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _percentile(reps: np.ndarray, level: float) -> tuple[float, float, int]:
    """Percentile bounds of the finite resamples' metric; NaN bounds if any resample is not finite."""
    bad = int(np.count_nonzero(~np.isfinite(reps)))
    if bad:
        return math.nan, math.nan, bad
    low, high = np.quantile(reps, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high), 0


def _check_boot(n_boot: int, n_contexts: int) -> None:
    if n_boot < 1:
        raise RouteSAEError(f"n_boot must be at least 1, got {n_boot}")
    if n_contexts < 2:
        raise RouteSAEError(f"a context bootstrap needs at least 2 held-out contexts, got {n_contexts}")


def _stack_1d(sums: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Keys and the [n_contexts, n_keys] matrix of one run's per-context sums."""
    if not sums:
        raise RouteSAEError("no per-context sums given")
    keys = list(sums)
    cols = [np.asarray(sums[k], dtype=np.float64) for k in keys]
    for k, c in zip(keys, cols):
        if c.ndim != 1:
            raise RouteSAEError(f"per-context sums {k!r} must be one row [n_contexts], got shape {c.shape}")
        if c.shape != cols[0].shape:
            raise RouteSAEError(f"per-context sums {k!r} has {c.size} contexts, {keys[0]!r} has {cols[0].size}")
    return keys, np.stack(cols, axis=1)


def context_bootstrap(
    metric_fn: MetricFn,
    sums: Mapping[str, np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Percentile bootstrap over held-out contexts of a ratio-of-sums metric for one run.

    `sums` maps each sum's name to its per-context values [n_contexts]. Each resample draws
    n_contexts contexts with replacement and recomputes the metric from the resampled totals."""
    _check_level(level)
    keys, mat = _stack_1d(sums)
    n = mat.shape[0]
    _check_boot(n_boot, n)
    estimate = float(metric_fn({k: mat[:, j].sum() for j, k in enumerate(keys)}))
    (rng,) = _generators(seed, 1)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    reps = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        totals = _counts(_draw_indices(rng, rows, n), n) @ mat  # [rows, n_keys]
        reps[start : start + rows] = metric_fn({k: totals[:, j] for j, k in enumerate(keys)})
    low, high, bad = _percentile(reps, level)
    method = f"percentile bootstrap over {n} contexts ({n_boot} resamples), {_pct(level)}"
    if bad:
        method += f"; {bad} resamples not finite: no interval"
    return Interval(estimate, low, high, n, method)


def _stack_arm(arm: Mapping[str, np.ndarray], keys: list[str], name: str) -> np.ndarray:
    """[n_seeds, n_contexts, n_keys] of one arm; a 1-D [n_contexts] array counts as one seed."""
    missing = [k for k in keys if k not in arm]
    if missing or len(arm) != len(keys):
        raise RouteSAEError(f"arms A and B must have the same sums; {name} has {sorted(arm)}, expected {sorted(keys)}")
    cols = []
    for k in keys:
        c = np.asarray(arm[k], dtype=np.float64)
        if c.ndim == 1:
            c = c[None, :]
        if c.ndim != 2:
            raise RouteSAEError(f"arm {name} sums {k!r} must be [n_seeds, n_contexts], got shape {c.shape}")
        cols.append(c)
    shape = cols[0].shape
    for k, c in zip(keys, cols):
        if c.shape != shape:
            raise RouteSAEError(f"arm {name} sums {k!r} has shape {c.shape}, {keys[0]!r} has {shape}")
    if shape[0] < 1:
        raise RouteSAEError(f"arm {name} has no seeds")
    return np.stack(cols, axis=2)


def paired_difference(
    metric_fn: MetricFn,
    sums_a: Mapping[str, np.ndarray],
    sums_b: Mapping[str, np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Difference:
    """Seed-mean metric of arm A minus that of arm B, with a two-level percentile bootstrap interval.

    `sums_a` and `sums_b` map each sum's name to [n_seeds, n_contexts] (rows = seeds of that arm;
    [n_contexts] = one seed), on the same held-out contexts in the same order.

    Why two levels: seeds and contexts are both sources of chance, so each resample draws seeds
    with replacement within each arm (training noise) and one context resample shared by both
    arms; sharing it keeps the pairing by context, which removes the per-context difficulty both
    arms see and makes the interval narrower than resampling each arm's contexts apart. With one
    seed per arm it is a paired context bootstrap. With 3 seeds the seed level is coarse (10
    distinct seed draws per arm, variance shrunk by (n-1)/n): read it as a floor on training noise."""
    _check_level(level)
    if not sums_a:
        raise RouteSAEError("no per-context sums given for arm A")
    keys = list(sums_a)
    a = _stack_arm(sums_a, keys, "A")
    b = _stack_arm(sums_b, keys, "B")
    n_a, n, m = a.shape
    n_b = b.shape[0]
    if b.shape[1] != n:
        raise RouteSAEError(f"arms must share their held-out contexts: A has {n}, B has {b.shape[1]}")
    _check_boot(n_boot, n)

    def seed_metrics(totals: np.ndarray) -> np.ndarray:
        # totals [..., n_keys] -> metric [...]
        return np.asarray(metric_fn({k: totals[..., j] for j, k in enumerate(keys)}), dtype=np.float64)

    mean_a = float(seed_metrics(a.sum(axis=1)).mean())
    mean_b = float(seed_metrics(b.sum(axis=1)).mean())
    # one matrix [n_contexts, (n_a + n_b) * n_keys]: a context resample's totals for every seed of
    # both arms come from a single product with its counts
    mat = np.concatenate([a, b], axis=0).transpose(1, 0, 2).reshape(n, (n_a + n_b) * m)
    ctx_rng, a_rng, b_rng = _generators(seed, 3)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, (n_a + n_b) * m))
    reps = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        totals = (_counts(_draw_indices(ctx_rng, rows, n), n) @ mat).reshape(rows, n_a + n_b, m)
        per_seed = seed_metrics(totals)  # [rows, n_a + n_b]
        pick_a = _draw_indices(a_rng, rows, n_a)
        pick_b = _draw_indices(b_rng, rows, n_b)
        ma = np.take_along_axis(per_seed[:, :n_a], pick_a, axis=1).mean(axis=1)
        mb = np.take_along_axis(per_seed[:, n_a:], pick_b, axis=1).mean(axis=1)
        reps[start : start + rows] = ma - mb
    low, high, bad = _percentile(reps, level)
    if n_a == 1 and n_b == 1:
        method = f"paired percentile bootstrap over {n} contexts (1 seed per arm, {n_boot} resamples), {_pct(level)}"
    else:
        method = (
            f"two-level percentile bootstrap: {n_a} vs {n_b} seeds resampled within arm, "
            f"{n} contexts resampled jointly ({n_boot} resamples), {_pct(level)}"
        )
    if bad:
        method += f"; {bad} resamples not finite: no interval"
    return Difference(mean_a - mean_b, low, high, n, n_a, n_b, mean_a, mean_b, method)


Verdict = Literal["holds", "reversed", "undecided"]


def verdict(diff: Interval | Difference, better: Literal["lower", "higher"] = "lower") -> Verdict:
    """Whether a difference A - B backs the claim "A is `better` than B".

    "holds": the interval excludes 0 on the expected side (all below 0 for better="lower");
    "reversed": it excludes 0 on the other side; "undecided": it contains 0, or there is none."""
    if better not in ("lower", "higher"):
        raise RouteSAEError(f"better must be 'lower' or 'higher', got {better!r}")
    low, high = diff.low, diff.high
    if math.isnan(low) or math.isnan(high):
        return "undecided"
    if high < 0:
        return "holds" if better == "lower" else "reversed"
    if low > 0:
        return "holds" if better == "higher" else "reversed"
    return "undecided"


def _fmt(x: float, digits: int) -> str:
    text = f"{x:.{digits}f}"
    # "-0.00" reads as a sign that the rounding has thrown away
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def format_interval(est: float, low: float, high: float, digits: int = 2) -> str:
    """"-0.19 [-0.23, -0.15]"; "0.31 (no interval)" when a bound is NaN."""
    if math.isnan(low) or math.isnan(high):
        return f"{_fmt(est, digits)} (no interval)"
    return f"{_fmt(est, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def l0_matched(l0_a: float, l0_b: float, tolerance: float = 0.10) -> bool:
    """Whether two held-out L0s are close enough to compare at: |a - b| <= tolerance * max(a, b)."""
    if tolerance < 0:
        raise RouteSAEError(f"L0 tolerance must be at least 0, got {tolerance}")
    if l0_a < 0 or l0_b < 0:
        raise RouteSAEError(f"held-out L0 cannot be negative, got {l0_a} and {l0_b}")
    if math.isnan(l0_a) or math.isnan(l0_b):
        return False
    return abs(l0_a - l0_b) <= tolerance * max(l0_a, l0_b)
