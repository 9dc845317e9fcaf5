"""The experiment's finished evaluations gathered into tables with their uncertainty: per row (an SAE
or a routing baseline, named alike in every seed's eval) the whole-run metrics of each seed, the
per-context sums behind them, and from those the seed intervals, the per-context bootstrap
intervals and the paired comparisons of the reference architecture against each other one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from routesae.errors import RouteSAEError
from routesae.reproduce import stats
from routesae.reproduce.config import Experiment
from routesae.reproduce.stages import budget_tag


class Metric(NamedTuple):
    """A metric of the tables: its report.json column, how it re-forms from per-context sums, and
    which way is better."""

    column: str
    label: str
    ratio: Callable[[Mapping[str, np.ndarray]], np.ndarray] | None
    better: str
    """'lower' or 'higher'."""
    needs_splice: bool


def _sum_ratio(num: str, den: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    return lambda s: s[num] / s[den]


LAYER_SEP = "|"
"""A mean-of-layers row's sums are its layer rows' sums under 'ROW|name' keys."""


def _layer_mean(ratio: Callable[[Mapping[str, np.ndarray]], np.ndarray]) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """A ratio that, on a mean-of-layers row's sums, is the mean over its layers of the ratio (as
    eval's mean row is), and on any other row the ratio itself."""
    def metric(s: Mapping[str, np.ndarray]) -> np.ndarray:
        layers = sorted({key.split(LAYER_SEP, 1)[0] for key in s if LAYER_SEP in key})
        if not layers:
            return ratio(s)
        return np.mean([ratio({key.split(LAYER_SEP, 1)[1]: v for key, v in s.items() if key.startswith(layer + LAYER_SEP)})
                        for layer in layers], axis=0)
    return metric


METRICS = (
    Metric("l0", "L0", _layer_mean(_sum_ratio("l0_sum", "n_tokens")), "lower", False),
    Metric("fvu", "FVU", _layer_mean(_sum_ratio("sse", "sst")), "lower", False),
    Metric("kl_per_token", "KL/token", _layer_mean(_sum_ratio("kl_sum", "n_kl")), "lower", True),
    Metric("delta_ce", "delta CE", _layer_mean(lambda s: (s["ce_spliced_sum"] - s["ce_clean_sum"]) / s["n_ce"]),
           "lower", True),
    Metric("loss_recovered", "loss recovered", _layer_mean(
        lambda s: 1.0 - (s["ce_spliced_sum"] - s["ce_clean_sum"]) / (s["ce_zero_sum"] - s["ce_clean_sum"])),
        "higher", True),
)
COMPARED = ("kl_per_token", "fvu", "loss_recovered")
"""The metrics of the paired comparisons (KL is the paper's claim; FVU and loss recovered beside it)."""


class Run(NamedTuple):
    """One eval (a budget and a seed): its report.json table rows by name, and the per-context sums."""

    rows: dict[str, dict[str, Any]]
    sums: dict[str, dict[str, np.ndarray]] | None
    """row name -> sum name -> [n_contexts]; None when eval wrote no per_context.npz."""
    routing: dict[str, dict[str, Any]]
    """row name -> the row's routing record (RouteSAEs)."""


def is_mean_row(row: dict[str, Any]) -> bool:
    """eval's row of the mean over an MLSAE's or crosscoder's per-layer rows."""
    return str(row.get("arch", "")).endswith("/mean")


def is_layer_row(row: dict[str, Any]) -> bool:
    """One layer of an MLSAE or crosscoder spliced alone."""
    return bool(row.get("layer_of")) and not is_mean_row(row)


def read_run(folder: Path) -> Run | None:
    report = folder / "report.json"
    if not report.exists():
        return None
    data = json.loads(report.read_text())
    rows = {r["name"]: r for r in data["table"]}
    routing = {r["name"]: r["cache"]["routing"] for r in data["rows"] if (r.get("cache") or {}).get("routing")}
    for r in data["rows"]:
        if r["name"] in rows:
            rows[r["name"]]["layer_of"] = r.get("layer_of")
    sums = None
    npz = folder / "per_context.npz"
    if npz.exists():
        from routesae.evaluate.per_context import read_per_context

        pc = read_per_context(npz)
        sums = {name: {metric: np.asarray(values[i], dtype=np.float64) for metric, values in pc.metrics.items()}
                for i, name in enumerate(pc.names)}
        # eval's "(mean of N layers)" rows are derived, not in the file: their layers' sums, keyed apart
        for name, row in rows.items():
            if not is_mean_row(row):
                continue
            members = [n for n, r in rows.items() if is_layer_row(r) and r.get("layer_of") == row.get("layer_of")]
            if members and all(n in sums for n in members):
                sums[name] = {f"{n}{LAYER_SEP}{key}": v for n in members for key, v in sums[n].items()}
    return Run(rows, sums, routing)


def read_runs(exp: Experiment, out: Path) -> dict[tuple[float, int], Run]:
    runs = {}
    for fraction in exp.grid.budgets:
        for seed in exp.grid.seeds:
            run = read_run(out / "evals" / budget_tag(fraction) / f"seed-{seed}")
            if run is not None:
                runs[(fraction, seed)] = run
    return runs


def _finite(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else float("nan")


class Cell(NamedTuple):
    """A table cell: the mean over seeds, its interval over seeds, and the first seed's per-context
    bootstrap interval."""

    seeds: stats.Interval
    contexts: stats.Interval | None


def row_names(runs: dict[tuple[float, int], Run], fraction: float) -> list[str]:
    """The rows every seed's eval at this budget has, in report order."""
    tables = [r.rows for (b, _), r in sorted(runs.items()) if b == fraction]
    if not tables:
        return []
    return [name for name in tables[0] if all(name in t for t in tables)]


def table_cells(runs: dict[tuple[float, int], Run], fraction: float, seeds: list[int]) -> dict[str, dict[str, Cell]]:
    """row name -> metric column -> Cell, at one budget."""
    out: dict[str, dict[str, Cell]] = {}
    mine = [(s, runs[(fraction, s)]) for s in seeds if (fraction, s) in runs]
    for name in row_names(runs, fraction):
        cells = {}
        for m in METRICS:
            values = [_finite(run.rows[name].get(m.column)) for _, run in mine]
            if all(math.isnan(v) for v in values):
                continue
            seed_iv = stats.seed_interval([v for v in values if not math.isnan(v)])
            ctx = None
            first = mine[0][1].sums
            if first is not None and name in first and m.ratio is not None:
                try:
                    ctx = stats.context_bootstrap(m.ratio, first[name])
                except (KeyError, RouteSAEError):
                    ctx = None
            cells[m.column] = Cell(seed_iv, ctx)
        out[name] = cells
    return out


class Comparison(NamedTuple):
    """The reference row minus another row on one metric, at one budget."""

    reference: str
    other: str
    metric: str
    diff: stats.Difference
    verdict: str
    l0_matched: bool
    l0: tuple[float, float]


def comparisons(exp: Experiment, runs: dict[tuple[float, int], Run], fraction: float) -> list[Comparison]:
    """The reference architecture's rows against every other whole-SAE row of the same k (and the
    reference's own routing baselines), paired over seeds and contexts."""
    mine = [runs[(fraction, s)] for s in exp.grid.seeds if (fraction, s) in runs]
    if not mine or any(r.sums is None for r in mine):
        return []
    rows = mine[0].rows
    out = []
    for ref_name, ref in rows.items():
        if ref.get("arch") != exp.grid.reference or ref.get("layer_of"):
            continue
        for name, row in rows.items():
            if name == ref_name or row.get("k") != ref.get("k") or is_layer_row(row):
                continue
            if not all(name in r.sums and ref_name in r.sums for r in mine):
                continue
            l0_ref, l0_other = (float(np.mean([_finite(r.rows[n].get("l0")) for r in mine])) for n in (ref_name, name))
            for m in METRICS:
                if m.column not in COMPARED:
                    continue
                try:
                    a, b = _same_keys([r.sums[ref_name] for r in mine], [r.sums[name] for r in mine])
                    diff = stats.paired_difference(m.ratio, a, b)
                except (KeyError, RouteSAEError):
                    continue
                out.append(Comparison(ref_name, name, m.column, diff, stats.verdict(diff, m.better),
                                      stats.l0_matched(l0_ref, l0_other), (l0_ref, l0_other)))
    return out


def _groups(sums: dict[str, np.ndarray]) -> list[str]:
    return sorted({key.split(LAYER_SEP, 1)[0] for key in sums if LAYER_SEP in key})


def _same_keys(a_runs: list[dict[str, np.ndarray]], b_runs: list[dict[str, np.ndarray]]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two arms' sums (one dict per seed) -> [n_seeds, n_contexts] arrays under the same keys, as
    the paired bootstrap needs: a mean-of-layers arm's layers become groups L0..Ln-1, and a plain
    arm facing one is repeated in every group (the mean of n equal ratios is that ratio)."""
    n = max(len(_groups(a_runs[0])), len(_groups(b_runs[0])), 1)

    def arm(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        groups = _groups(runs[0])
        out: dict[str, list[np.ndarray]] = {}
        for sums in runs:
            if groups:
                if len(groups) != n:
                    raise RouteSAEError("the two arms average over different numbers of layers")
                items = {f"L{groups.index(k.split(LAYER_SEP, 1)[0])}{LAYER_SEP}{k.split(LAYER_SEP, 1)[1]}": v
                         for k, v in sums.items()}
            elif n > 1:
                items = {f"L{j}{LAYER_SEP}{k}": v for j in range(n) for k, v in sums.items()}
            else:
                items = dict(sums)
            for k, v in items.items():
                out.setdefault(k, []).append(v)
        return {k: np.stack(v) for k, v in out.items()}

    return arm(a_runs), arm(b_runs)
