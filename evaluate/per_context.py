"""Eval's metrics per held-out context, as additive sums: what bootstrap intervals over contexts and
paired comparisons of SAEs on the same contexts are computed from.

A context is one row of `context_len` store tokens in the evaluated range; its index is its store
token offset divided by `context_len`. For each report row that is evaluated on its own (every row
but the "mean of N layers" rows of MLSAE and crosscoder, which are means of their per-layer rows'
figures and are re-formed from those, see `layer_of`) and each context, eval keeps sums whose
ratios, over any multiset of contexts, are the report's figures; over all contexts they equal the
report's up to float rounding.

File format (`per_context.npz`, plain numpy arrays, no pickles: `np.load(path)` reads it without
routesae):

- `format`: the string "routesae-per-context"; `version`: 1.
- `names` [n_rows] str: the report rows' names, in the report's order (without the mean rows).
- `layer_of` [n_rows] str: for a multi-layer SAE's per-layer row its SAE's name (the report's mean
  row of that SAE is the mean over these rows of each figure), else "".
- `contexts` [n_contexts] int64: the store context index of each column.
- `context_len`: tokens per context.
- `metrics` [n_metrics] str: the names of the metric arrays below that the file holds.
- one float64 array [n_rows, n_contexts] per metric. From the store (always):
  `n_tokens` non-special tokens scored; `l0_sum` firing latents summed over them; `normmse_sum`
  the per-token NormMSE summed; `sse` and `sst`, the context's shares of FVU's numerator and
  denominator: sum over its tokens of ||r - mean(r)||^2 and ||x - mean(x)||^2 in model space
  (r = x - x_hat), both means over all evaluated tokens, as FVU's variances take them (NaN where
  FVU is: soft routing). When some row was spliced (NaN on the rows that were not, such as soft
  routing; absent without --splice): `n_kl` positions KL is measured at and `kl_sum` its sum
  (nats); `n_ce` positions CE is measured at and `ce_clean_sum`, `ce_spliced_sum`, `ce_zero_sum`
  the clean, spliced and zero-ablated cross-entropies summed.

The report's figures are then: L0 = sum l0_sum / sum n_tokens, NormMSE = sum normmse_sum / sum
n_tokens, FVU = sum sse / sum sst, KL/token = sum kl_sum / sum n_kl, KL/context = sum kl_sum /
contexts, CE(x) = sum ce_x_sum / sum n_ce, delta-CE = CE(spliced) - CE(clean), loss recovered =
(sum ce_zero_sum - sum ce_spliced_sum) / (sum ce_zero_sum - sum ce_clean_sum); `figures` computes
them all for any selection of contexts (indices into the columns, repeats allowed: a bootstrap
resample). On a resample, FVU's pieces keep the whole run's means: the ratio is that of the
resample's shares of the run's variances, which differs from recentring on the resample by the
squared shift of the mean (relatively, of the order of 1 / contexts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from routesae.atomic_files import atomic_open
from routesae.errors import RouteSAEError

FORMAT = "routesae-per-context"
VERSION = 1
CACHE_METRICS = ("n_tokens", "l0_sum", "normmse_sum", "sse", "sst")
"""Per-context sums of the cache metrics, every row."""
SPLICE_METRICS = ("n_kl", "kl_sum", "n_ce", "ce_clean_sum", "ce_spliced_sum", "ce_zero_sum")
"""Per-context sums of the splice metrics (with --splice)."""


class PerContext(NamedTuple):
    """Eval's additive per-context sums: metric -> float64 [n_rows, n_contexts]."""

    names: list[str]
    """The report rows' names (the mean-of-layers rows left out)."""
    contexts: np.ndarray
    """int64 [n_contexts]: store context index of each column (token offset // context_len)."""
    metrics: dict[str, np.ndarray]
    """Metric name (CACHE_METRICS, and SPLICE_METRICS when spliced) -> float64 [n_rows, n_contexts]."""
    context_len: int
    """Tokens per context."""
    layer_of: list[str]
    """Per row: the multi-layer SAE a per-layer row belongs to, else ""."""


def write_per_context(path: str | os.PathLike, pc: PerContext) -> Path:
    """Write `pc` as per_context.npz (see the module's docstring for the format), whole or not at all."""
    n_rows, n_ctx = len(pc.names), len(pc.contexts)
    for name, a in pc.metrics.items():
        if a.shape != (n_rows, n_ctx):
            raise ValueError(f"per-context metric {name!r} has shape {a.shape}, not ({n_rows}, {n_ctx})")
    arrays = {
        "format": np.array(FORMAT), "version": np.array(VERSION, dtype=np.int64),
        "names": np.array(pc.names, dtype=str).reshape(n_rows),
        "layer_of": np.array(pc.layer_of, dtype=str).reshape(n_rows),
        "contexts": np.asarray(pc.contexts, dtype=np.int64), "context_len": np.array(pc.context_len, dtype=np.int64),
        "metrics": np.array(list(pc.metrics), dtype=str).reshape(len(pc.metrics)),
        **{name: np.asarray(a, dtype=np.float64) for name, a in pc.metrics.items()},
    }
    path = Path(path)
    with atomic_open(path, "wb") as f:  # a file object: np.savez would add .npz to the temporary name
        np.savez(f, **arrays)
    return path


def read_per_context(path: str | os.PathLike) -> PerContext:
    """Read a per_context.npz written by write_per_context."""
    path = Path(path)
    if not path.is_file():
        raise RouteSAEError(f"no per-context file at {path} (routesae eval --out writes per_context.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise RouteSAEError(f"{path} is not a readable .npz file: {e}") from None
    if str(data.get("format", "")) != FORMAT:
        raise RouteSAEError(f"{path} is not a routesae per-context file (no format {FORMAT!r})")
    if int(data["version"]) != VERSION:
        raise RouteSAEError(f"{path} is per-context format version {int(data['version'])}; "
                            f"this routesae reads {VERSION}")
    names = [str(n) for n in data["names"]]
    metrics = {str(m): data[str(m)] for m in data["metrics"]}
    return PerContext(names, data["contexts"], metrics, int(data["context_len"]), [str(n) for n in data["layer_of"]])


def _rows(pc: PerContext, rows: Sequence[int | str] | None) -> np.ndarray:
    if rows is None:
        return np.arange(len(pc.names))
    index = {n: i for i, n in enumerate(pc.names)}
    out = []
    for r in rows:
        if isinstance(r, str):
            if r not in index:
                raise RouteSAEError(f"no row {r!r} in the per-context sums (rows: {', '.join(pc.names)})")
            out.append(index[r])
        else:
            out.append(int(r))
    return np.asarray(out, dtype=np.int64)


def summed(pc: PerContext, metric: str, rows: Sequence[int | str] | None = None,
           contexts: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
    """A metric summed over `contexts` (column positions, repeats allowed; None: all) -> [rows]."""
    if metric not in pc.metrics:
        raise RouteSAEError(f"no per-context metric {metric!r} (held: {', '.join(pc.metrics)}; splice metrics need "
                            "eval --splice)")
    a = pc.metrics[metric][_rows(pc, rows)]
    if contexts is not None:
        a = a[:, np.asarray(contexts, dtype=np.int64)]
    return a.sum(axis=1)


def ratio(pc: PerContext, numerator: str, denominator: str, rows: Sequence[int | str] | None = None,
          contexts: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
    """sum numerator / sum denominator over `contexts`, per row (NaN where the denominator is 0)."""
    num, den = summed(pc, numerator, rows, contexts), summed(pc, denominator, rows, contexts)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def figures(pc: PerContext, rows: Sequence[int | str] | None = None,
            contexts: np.ndarray | Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The report's figures, per row, re-formed from the sums over `contexts`: l0, normmse, fvu and,
    when spliced, kl_per_token, kl_per_context, ce_clean, ce_spliced, ce_zero, delta_ce,
    loss_recovered."""
    out = {"l0": ratio(pc, "l0_sum", "n_tokens", rows, contexts),
           "normmse": ratio(pc, "normmse_sum", "n_tokens", rows, contexts),
           "fvu": ratio(pc, "sse", "sst", rows, contexts)}
    if "kl_sum" not in pc.metrics:
        return out
    n_ctx = len(pc.contexts) if contexts is None else len(np.asarray(contexts))
    out["kl_per_token"] = ratio(pc, "kl_sum", "n_kl", rows, contexts)
    kl = summed(pc, "kl_sum", rows, contexts)
    out["kl_per_context"] = kl / n_ctx if n_ctx else np.full_like(kl, np.nan)
    for which in ("clean", "spliced", "zero"):
        out[f"ce_{which}"] = ratio(pc, f"ce_{which}_sum", "n_ce", rows, contexts)
    out["delta_ce"] = out["ce_spliced"] - out["ce_clean"]
    zero, spliced, clean = (summed(pc, f"ce_{w}_sum", rows, contexts) for w in ("zero", "spliced", "clean"))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["loss_recovered"] = np.where(zero != clean, (zero - spliced) / np.where(zero != clean, zero - clean, 1.0),
                                         np.nan)
    return out
