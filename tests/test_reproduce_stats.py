"""reproduce.stats against independent computations: hand t-intervals, loop bootstraps, coverage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from routesae.errors import RouteSAEError
from routesae.reproduce import stats
from routesae.reproduce.stats import (
    Difference,
    Interval,
    context_bootstrap,
    format_interval,
    l0_matched,
    paired_difference,
    seed_interval,
    verdict,
)


def _ratio(s):
    return s["sse"] / s["sst"]


def _loop_rngs(seed: int, count: int) -> list[np.random.Generator]:
    # the documented streams: child i of SeedSequence(seed); contexts, then arm A's seeds, then B's
    return [np.random.default_rng(c) for c in np.random.SeedSequence(seed).spawn(count)]


def _loop_indices(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.floor(rng.random(n) * n).astype(int)


def _contexts(rng: np.random.Generator, n: int, ratio: float = 0.3, spread: float = 0.3) -> dict[str, np.ndarray]:
    sst = rng.gamma(2.0, 5.0, n)
    sse = ratio * sst * rng.lognormal(-spread**2 / 2, spread, n)
    return {"sse": sse, "sst": sst}


# ---------------------------------------------------------------- seed_interval


def test_seed_interval_matches_hand_formula_with_table_t():
    x = [0.31, 0.35, 0.29]
    mean = sum(x) / 3
    s = math.sqrt(sum((v - mean) ** 2 for v in x) / 2)
    half = 4.302652729911275 * s / math.sqrt(3)  # t_{0.975, 2} from a t table
    got = seed_interval(x)
    assert isinstance(got, Interval)
    assert got.estimate == pytest.approx(mean, rel=1e-12)
    assert got.low == pytest.approx(mean - half, rel=1e-9)
    assert got.high == pytest.approx(mean + half, rel=1e-9)
    assert got.n == 3 and got.method == "Student t over 3 seeds, 95%"

    y = [1.0, 2.0, 4.0, 3.0, 7.0]
    m = sum(y) / 5
    half90 = 2.131846786326649 * math.sqrt(sum((v - m) ** 2 for v in y) / 4) / math.sqrt(5)  # t_{0.95, 4}
    got90 = seed_interval(np.array(y), level=0.90)
    assert (got90.low, got90.high) == pytest.approx((m - half90, m + half90), rel=1e-9)
    assert got90.method.endswith("90%")


def test_seed_interval_one_seed_has_no_interval():
    got = seed_interval([0.42])
    assert got.estimate == 0.42 and got.n == 1
    assert math.isnan(got.low) and math.isnan(got.high)
    assert got.method == "1 seed: no interval"
    assert verdict(got) == "undecided"
    assert format_interval(got.estimate, got.low, got.high) == "0.42 (no interval)"


def test_seed_interval_refuses_nothing_and_bad_levels():
    with pytest.raises(RouteSAEError, match="at least one seed"):
        seed_interval([])
    with pytest.raises(RouteSAEError, match="between 0 and 1"):
        seed_interval([1.0, 2.0], level=95)


# ---------------------------------------------------------------- context_bootstrap


def _loop_context_bootstrap(sums, n_boot, seed, level=0.95):
    (rng,) = _loop_rngs(seed, 1)
    n = len(sums["sse"])
    reps = []
    for _ in range(n_boot):
        idx = _loop_indices(rng, n)
        reps.append(sums["sse"][idx].sum() / sums["sst"][idx].sum())
    return np.array(reps), np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])


@pytest.mark.parametrize("chunk_elements", [stats._CHUNK_ELEMENTS, 37, 200])
def test_context_bootstrap_agrees_with_a_plain_loop(monkeypatch, chunk_elements):
    # 37 contexts: chunks of 1 and of 5 resamples must draw exactly what one big chunk draws
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", chunk_elements)
    sums = _contexts(np.random.default_rng(1), 37)
    got = context_bootstrap(_ratio, sums, n_boot=300, seed=7)
    _, (low, high) = _loop_context_bootstrap(sums, 300, 7)
    assert got.estimate == sums["sse"].sum() / sums["sst"].sum()
    assert got.low == pytest.approx(low, rel=1e-12)
    assert got.high == pytest.approx(high, rel=1e-12)
    assert got.n == 37
    assert got.method == "percentile bootstrap over 37 contexts (300 resamples), 95%"


def test_context_bootstrap_covers_the_true_ratio_of_sums():
    # small contexts have a higher per-context ratio, so the mean of per-context ratios (0.45) is
    # not the ratio of expected sums: E[sse] / E[sst] = (0.2 * 2.5 + 0.4) / 2.5 = 0.36
    rng = np.random.default_rng(2024)
    true_ratio, n_sims, hits = 0.36, 300, 0
    for sim in range(n_sims):
        size = rng.choice([1.0, 4.0], 120)
        sst = size * rng.gamma(4.0, 0.25, 120)
        sse = sst * (0.2 + 0.4 / size * rng.lognormal(-0.125, 0.5, 120))
        got = context_bootstrap(_ratio, {"sse": sse, "sst": sst}, n_boot=400, seed=sim)
        hits += got.low <= true_ratio <= got.high
    assert 0.90 <= hits / n_sims <= 0.99


def test_context_bootstrap_refusals_and_non_finite_resamples():
    with pytest.raises(RouteSAEError, match="at least 2 held-out contexts"):
        context_bootstrap(_ratio, {"sse": np.ones(1), "sst": np.ones(1)})
    with pytest.raises(RouteSAEError, match="has 3 contexts"):
        context_bootstrap(_ratio, {"sse": np.ones(4), "sst": np.ones(3)})
    with pytest.raises(RouteSAEError, match="one row"):
        context_bootstrap(_ratio, {"sse": np.ones((2, 4)), "sst": np.ones((2, 4))})
    with pytest.raises(RouteSAEError, match="n_boot"):
        context_bootstrap(_ratio, {"sse": np.ones(4), "sst": np.ones(4)}, n_boot=0)
    # a resample of only the zero-sst context divides 0 by 0: no interval rather than a wrong one
    sums = {"sse": np.array([0.0, 1.0]), "sst": np.array([0.0, 2.0])}
    with np.errstate(invalid="ignore"):
        got = context_bootstrap(_ratio, sums, n_boot=200)
    assert got.estimate == 0.5 and math.isnan(got.low) and math.isnan(got.high)
    assert "not finite: no interval" in got.method


# ---------------------------------------------------------------- paired_difference


def _correlated_arms(rng, n, n_seeds_a=1, n_seeds_b=1, seed_sd=0.0):
    """Two arms that see the same per-context difficulty (shared factor d), A's ratio 0.30, B's 0.32."""
    sst = rng.gamma(2.0, 5.0, n)
    d = rng.lognormal(-0.5, 1.0, n)

    def arm(r, seeds):
        rows = [(r + seed_sd * rng.standard_normal()) * sst * d * rng.lognormal(-0.005, 0.1, n) for _ in range(seeds)]
        return {"sse": np.array(rows), "sst": np.tile(sst, (seeds, 1))}

    return arm(0.30, n_seeds_a), arm(0.32, n_seeds_b)


def _loop_two_level(metric, a, b, n_boot, seed, level=0.95):
    ctx, ra, rb = _loop_rngs(seed, 3)
    key = next(iter(a))
    n_a, n = a[key].shape
    n_b = b[key].shape[0]
    reps = []
    for _ in range(n_boot):
        idx = _loop_indices(ctx, n)
        pa, pb = _loop_indices(ra, n_a), _loop_indices(rb, n_b)
        ma = np.mean([metric({k: v[s, idx].sum() for k, v in a.items()}) for s in pa])
        mb = np.mean([metric({k: v[s, idx].sum() for k, v in b.items()}) for s in pb])
        reps.append(ma - mb)
    return np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])


def test_paired_difference_one_seed_is_a_paired_context_bootstrap():
    a, b = _correlated_arms(np.random.default_rng(3), 41)
    a1 = {k: v[0] for k, v in a.items()}  # 1-D arrays: one seed
    b1 = {k: v[0] for k, v in b.items()}
    got = paired_difference(_ratio, a1, b1, n_boot=300, seed=5)
    assert isinstance(got, Difference)
    # same seed -> same context resamples as context_bootstrap, differenced replicate by replicate
    ra, _ = _loop_context_bootstrap(a1, 300, 5)
    rb, _ = _loop_context_bootstrap(b1, 300, 5)
    low, high = np.quantile(ra - rb, [0.025, 0.975])
    assert got.low == pytest.approx(low, rel=1e-12) and got.high == pytest.approx(high, rel=1e-12)
    ea, eb = a1["sse"].sum() / a1["sst"].sum(), b1["sse"].sum() / b1["sst"].sum()
    assert got.estimate == pytest.approx(ea - eb, rel=1e-12)
    assert (got.mean_a, got.mean_b) == pytest.approx((ea, eb), rel=1e-12)
    assert (got.n, got.n_seeds_a, got.n_seeds_b) == (41, 1, 1)
    assert got.method == "paired percentile bootstrap over 41 contexts (1 seed per arm, 300 resamples), 95%"
    assert paired_difference(_ratio, a, b, n_boot=300, seed=5) == got  # [1, n] rows: the same


def test_paired_is_narrower_than_unpaired_for_correlated_arms():
    a, b = _correlated_arms(np.random.default_rng(4), 200)
    a1 = {k: v[0] for k, v in a.items()}
    b1 = {k: v[0] for k, v in b.items()}
    assert np.corrcoef(a1["sse"], b1["sse"])[0, 1] > 0.9
    got = paired_difference(_ratio, a1, b1, n_boot=1000, seed=0)
    # unpaired: each arm's contexts resampled apart
    rng = np.random.default_rng(99)
    reps = []
    for _ in range(1000):
        ia, ib = rng.integers(0, 200, 200), rng.integers(0, 200, 200)
        reps.append(_ratio({k: v[ia].sum() for k, v in a1.items()}) - _ratio({k: v[ib].sum() for k, v in b1.items()}))
    low_u, high_u = np.quantile(reps, [0.025, 0.975])
    assert got.high - got.low < 0.5 * (high_u - low_u)
    assert low_u < 0 < high_u  # unpaired cannot tell 0.30 from 0.32 here ...
    assert verdict(got, better="lower") == "holds"  # ... paired can


@pytest.mark.parametrize("chunk_elements", [stats._CHUNK_ELEMENTS, 30, 150])
def test_two_level_bootstrap_agrees_with_a_plain_loop(monkeypatch, chunk_elements):
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(6)
    n = 29

    def arm(seeds, shift):
        clean = rng.gamma(3.0, 1.0, (seeds, n)) + 10.0
        return {
            "ce_clean_sum": clean,
            "ce_spliced_sum": clean + rng.gamma(2.0, 0.1 + shift, (seeds, n)),
            "ce_zero_sum": clean + rng.gamma(5.0, 1.0, (seeds, n)),
        }

    a, b = arm(3, 0.0), arm(2, 0.05)
    got = paired_difference(stats.loss_recovered, a, b, n_boot=250, seed=11)
    low, high = _loop_two_level(stats.loss_recovered, a, b, 250, 11)
    assert got.low == pytest.approx(low, rel=1e-10) and got.high == pytest.approx(high, rel=1e-10)

    def lr(arm_sums, s):
        t = {k: v[s].sum() for k, v in arm_sums.items()}
        return 1 - (t["ce_spliced_sum"] - t["ce_clean_sum"]) / (t["ce_zero_sum"] - t["ce_clean_sum"])

    mean_a, mean_b = np.mean([lr(a, s) for s in range(3)]), np.mean([lr(b, s) for s in range(2)])
    assert got.estimate == pytest.approx(mean_a - mean_b, rel=1e-12)
    assert (got.n, got.n_seeds_a, got.n_seeds_b) == (29, 3, 2)
    assert got.method == (
        "two-level percentile bootstrap: 3 vs 2 seeds resampled within arm, 29 contexts resampled jointly "
        "(250 resamples), 95%"
    )


def test_two_level_bootstrap_widens_with_seed_noise_and_covers():
    # seed-to-seed spread must show in the interval: same contexts, seeds far apart vs identical
    quiet = _correlated_arms(np.random.default_rng(8), 150, 3, 3, seed_sd=0.0)
    noisy = _correlated_arms(np.random.default_rng(8), 150, 3, 3, seed_sd=0.05)
    w_quiet = paired_difference(_ratio, *quiet, n_boot=500)
    w_noisy = paired_difference(_ratio, *noisy, n_boot=500)
    assert w_noisy.high - w_noisy.low > 2 * (w_quiet.high - w_quiet.low)

    # coverage of the true difference 0.30 - 0.32 with 10 seeds per arm and seed noise
    rng = np.random.default_rng(9)
    n_sims, hits = 150, 0
    for sim in range(n_sims):
        a, b = _correlated_arms(rng, 100, 10, 10, seed_sd=0.01)
        got = paired_difference(_ratio, a, b, n_boot=300, seed=sim)
        hits += got.low <= -0.02 <= got.high
    assert 0.85 <= hits / n_sims <= 0.99


def test_paired_difference_refusals():
    a = {"sse": np.ones((2, 5)), "sst": np.ones((2, 5))}
    with pytest.raises(RouteSAEError, match="share their held-out contexts: A has 5, B has 4"):
        paired_difference(_ratio, a, {"sse": np.ones((2, 4)), "sst": np.ones((2, 4))})
    with pytest.raises(RouteSAEError, match="same sums"):
        paired_difference(_ratio, a, {"sse": np.ones(5), "n_tokens": np.ones(5)})
    with pytest.raises(RouteSAEError, match=r"arm B sums 'sst' has shape \(1, 5\)"):
        paired_difference(_ratio, a, {"sse": np.ones((2, 5)), "sst": np.ones(5)})
    with pytest.raises(RouteSAEError, match="at least 2 held-out contexts"):
        paired_difference(_ratio, {"sse": np.ones(1), "sst": np.ones(1)}, {"sse": np.ones(1), "sst": np.ones(1)})


# ---------------------------------------------------------------- verdict, format, L0 match


def _diff(est, low, high):
    return Difference(est, low, high, 100, 3, 3, math.nan, math.nan, "constructed")


def test_verdicts_on_constructed_intervals():
    below, above, across = _diff(-0.19, -0.23, -0.15), _diff(0.1, 0.05, 0.2), _diff(0.01, -0.02, 0.04)
    assert verdict(below) == "holds" and verdict(below, better="higher") == "reversed"
    assert verdict(above) == "reversed" and verdict(above, better="higher") == "holds"
    assert verdict(across) == "undecided" and verdict(across, better="higher") == "undecided"
    assert verdict(_diff(0.0, 0.0, 0.3), better="higher") == "undecided"  # touching 0 is not excluding it
    assert verdict(_diff(0.1, math.nan, math.nan)) == "undecided"
    with pytest.raises(RouteSAEError, match="'lower' or 'higher'"):
        verdict(below, better="smaller")


def test_format_interval():
    assert format_interval(-0.19, -0.23, -0.15) == "-0.19 [-0.23, -0.15]"
    assert format_interval(0.123456, 0.1, 0.15, digits=3) == "0.123 [0.100, 0.150]"
    assert format_interval(-0.001, -0.004, 0.002) == "0.00 [0.00, 0.00]"
    assert format_interval(0.31, math.nan, math.nan) == "0.31 (no interval)"
    d = _diff(-0.19, -0.23, -0.15)
    line = f"KL/token, RouteSAE - TopK at L0 32: {format_interval(d.estimate, d.low, d.high)} ({verdict(d)})"
    assert line == "KL/token, RouteSAE - TopK at L0 32: -0.19 [-0.23, -0.15] (holds)"


def test_l0_matched():
    assert l0_matched(32.0, 35.0)  # 3 / 35 = 8.6%
    assert not l0_matched(32.0, 36.0)  # 4 / 36 = 11.1%
    assert l0_matched(100.0, 90.0) and l0_matched(90.0, 100.0)  # exactly 10% of the larger
    assert not l0_matched(100.0, 89.9)
    assert l0_matched(64.0, 70.0, tolerance=0.1) and not l0_matched(64.0, 70.0, tolerance=0.05)
    assert l0_matched(0.0, 0.0)
    assert not l0_matched(math.nan, 32.0)
    with pytest.raises(RouteSAEError, match="cannot be negative"):
        l0_matched(-1.0, 32.0)
    with pytest.raises(RouteSAEError, match="tolerance"):
        l0_matched(32.0, 32.0, tolerance=-0.1)


def test_ratio_metrics_read_evals_sum_names():
    s = {
        "sse": np.array(2.0), "sst": np.array(8.0), "kl_sum": np.array(3.0), "n_tokens": np.array(12.0),
        "l0_sum": np.array(384.0), "ce_spliced_sum": np.array(40.0), "ce_clean_sum": np.array(30.0),
        "ce_zero_sum": np.array(70.0),
    }
    got = {name: float(fn(s)) for name, fn in stats.RATIO_METRICS.items()}
    assert got == {"fvu": 0.25, "kl_per_token": 0.25, "l0": 32.0, "loss_recovered": 0.75}


def test_plans_take_the_median_of_the_last_measured_rates(tmp_path, monkeypatch):
    """One stage slowed by a pause (49 min against 5) does not set the next plan's figure."""
    from routesae.reproduce import plan as plan_module

    monkeypatch.setattr(plan_module, "RATES", tmp_path / "rates.json")
    monkeypatch.setattr(plan_module, "_units", lambda stage: 2.0)
    monkeypatch.setattr(plan_module, "rate_key", lambda stage, exp: "eval|m|splice")
    (tmp_path / "rates.json").write_text(json.dumps({plan_module.machine_id(): {"eval|m|splice": 150.0}}))
    for seconds in (300, 2940, 320, 290, 310):
        plan_module.record_rate(None, None, seconds)
    kept = plan_module.read_rates()[plan_module.machine_id()]["eval|m|splice"]
    assert kept == [150.0, 300 / 2, 2940 / 2, 320 / 2, 290 / 2, 310 / 2][-plan_module.KEPT_RATES:]
    assert plan_module.measured_rate(kept) == 155.0
    assert plan_module.measured_rate(7.5) == 7.5 and plan_module.measured_rate([]) is None


def test_seed_difference_is_welchs_interval():
    """Against Welch's formula written out here: the difference of means, its standard error from
    each side's variance, and the Welch-Satterthwaite degrees of freedom."""
    from scipy import stats as sst

    from routesae.reproduce.stats import seed_difference

    a, b = np.array([0.715, 0.740, 0.723]), np.array([0.765, 0.788, 0.774, 0.770])
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = sst.t.ppf(0.975, df) * math.sqrt(va + vb)
    iv = seed_difference(a, b)
    assert iv.estimate == pytest.approx(a.mean() - b.mean())
    assert (iv.low, iv.high) == pytest.approx((a.mean() - b.mean() - half, a.mean() - b.mean() + half))
    assert "Welch" in iv.method and iv.n == 3
    one = seed_difference([0.7], b)
    assert math.isnan(one.low) and one.estimate == pytest.approx(0.7 - b.mean())
    with pytest.raises(RouteSAEError):
        seed_difference([], b)
