"""The experiment's report: one self-contained offline HTML page (plots inlined) and the same text as
markdown beside it, plus results.json with every figure. Sections: the main table at matched L0
with intervals, the paired comparisons and which of the paper's orderings hold, sparsity-fidelity
plots, the budget curves, RouteSAE's routing, quality, dashboards, steering, provenance."""

from __future__ import annotations

import base64
import html
import json
import math
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from routesae.atomic_files import save_figure, write_json, write_text
from routesae.json_values import jsonable
from routesae.reproduce import stats
from routesae.reproduce.collect import (
    METRICS, Cell, Comparison, comparisons, is_layer_row, read_runs, row_names, table_cells)
from routesae.reproduce.config import Experiment
from routesae.reproduce.runner import code_version, read_state
from routesae.reproduce.stages import Stage

CURVE_METRICS = ("kl_per_token", "fvu", "loss_recovered")
LABEL = {m.column: m.label for m in METRICS}
BETTER = {m.column: m.better for m in METRICS}


class Block(NamedTuple):
    """One piece of the report: kind 'h2', 'p', 'table' (data = (header, rows)), 'img' (data = path),
    'pre', 'ul' (data = items)."""

    kind: str
    data: Any


def write_report(exp: Experiment, stages: list[Stage], out: Path) -> list[Path]:
    """report/report.html, report.md, results.json and the PNGs; -> their paths, the HTML first."""
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    runs = read_runs(exp, out)
    full = exp.grid.budgets[-1]
    blocks: list[Block] = [Block("p", _summary_line(exp, runs))]
    results: dict[str, Any] = {"experiment": exp.to_json(), "budgets": {}}
    written: list[Path] = []

    # each budget's cells and comparisons once (bootstraps): the tables, results.json and the plots read them
    per_budget = {b: table_cells(runs, b, exp.grid.seeds) for b in exp.grid.budgets}
    comps = {b: comparisons(exp, runs, b) for b in exp.grid.budgets}
    cells = per_budget[full]
    blocks += _main_table(exp, cells)
    blocks += _comparison_blocks(exp, comps[full])
    for fraction in exp.grid.budgets:
        results["budgets"][str(fraction)] = {
            "rows": {name: {m: _cell_json(c) for m, c in row.items()} for name, row in per_budget[fraction].items()},
            "comparisons": [_comparison_json(c) for c in comps[fraction]]}

    unmatched = {(b, c.other) for b, cs in comps.items() for c in cs if not c.l0_matched}
    figures = _plots(exp, runs, per_budget, folder, unmatched)
    written += [p for p in figures.values() if p]
    if figures.get("sparsity"):
        blocks += [Block("h2", "Sparsity and fidelity"), Block("img", figures["sparsity"]),
                   Block("p", "Each point is an architecture at one k: mean over seeds, bars the 95% interval over seeds.")]
    if figures.get("budget"):
        blocks += [Block("h2", "Budget curve"), Block("img", figures["budget"]),
                   Block("p", _budget_text(exp))]
    if figures.get("routing"):
        blocks += [Block("h2", "RouteSAE's routing"), Block("img", figures["routing"]),
                   Block("p", "Share of held-out tokens routed to each layer (first seed, full budget).")]
    blocks += _quality_blocks(exp, out, results)
    blocks += _links(exp, out, folder)
    blocks += _steering(exp, out)
    provenance = _provenance(exp, stages, out)
    results["provenance"] = provenance
    # the page shows the commits stages ran on; results.json also maps each stage to its own
    shown = {k: v for k, v in provenance.items() if k != "stage_code"}
    blocks += [Block("h2", "Provenance"), Block("pre", json.dumps(shown, indent=2))]

    title = f"routesae reproduce: {exp.name}"
    md = _markdown(title, blocks, folder)
    page = _html(title, blocks)
    paths = [write_text(folder / "report.html", page), write_text(folder / "report.md", md),
             write_json(folder / "results.json", jsonable(results))]
    return paths + written


# ------------------------------------------------------------------------------------------- sections

def _summary_line(exp: Experiment, runs: dict) -> str:
    g = exp.grid
    have = sorted({s for (b, s) in runs if b == g.budgets[-1]})
    return (f"Model {g.model}; trained on {g.train_tokens} tokens of {g.train_corpus}, evaluated on {g.heldout_tokens} "
            f"held-out tokens of {g.heldout_corpus}. Architectures {', '.join(g.archs)} at k {', '.join(map(str, g.k))}; "
            f"seeds {', '.join(map(str, have))} of {', '.join(map(str, g.seeds))} evaluated at the full budget. "
            "Every figure is a mean over seeds with its 95% interval over seeds (Student t); "
            "the 'contexts' interval is a percentile bootstrap over held-out contexts within the first seed's run.")


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _cell_text(c: Cell) -> str:
    s = c.seeds
    text = _fmt(s.estimate)
    if math.isfinite(s.low):
        text += f" [{_fmt(s.low)}, {_fmt(s.high)}]"
    return text


def _main_table(exp: Experiment, cells: dict[str, dict[str, Cell]]) -> list[Block]:
    if not cells:
        return [Block("h2", "Results"), Block("p", "No evaluation has finished yet.")]
    columns = [m for m in METRICS if any(m.column in row for row in cells.values())]
    header = ["row"] + [m.label for m in columns] + [f"{LABEL[c]} (contexts)" for c in ("kl_per_token", "fvu")
                                                    if any(c in row for row in cells.values())]
    rows = []
    for name, row in cells.items():
        line = [name] + [_cell_text(row[m.column]) if m.column in row else "-" for m in columns]
        for c in ("kl_per_token", "fvu"):
            if any(c in r for r in cells.values()):
                ctx = row.get(c).contexts if c in row else None
                line.append(f"[{_fmt(ctx.low)}, {_fmt(ctx.high)}]" if ctx is not None and math.isfinite(ctx.low) else "-")
        rows.append(line)
    n = len(exp.grid.seeds)
    return [Block("h2", "Results at the full budget"), Block("table", (header, rows)),
            Block("p", f"Mean [95% interval over {n} seed{'s' if n != 1 else ''}]"
                  + ("" if n > 1 else ": one seed gives no interval") + ". KL/token is KL(clean || spliced) per "
                  "position; FVU is the fraction of variance unexplained in model space; loss recovered is "
                  "1 - (CE spliced - CE clean) / (CE zero-ablated - CE clean).")]


def _comparison_blocks(exp: Experiment, comps: list[Comparison]) -> list[Block]:
    if not comps:
        return [Block("h2", "Paired comparisons"),
                Block("p", "None: they need the per-context sums of every seed's spliced evaluation.")]
    lines, header = [], ["comparison", "metric", "difference [95%]", "verdict", "L0 (ref, other)"]
    for c in comps:
        lines.append([f"{c.reference} - {c.other}", LABEL[c.metric],
                      stats.format_interval(c.diff.estimate, c.diff.low, c.diff.high, 3), c.verdict,
                      f"{_fmt(c.l0[0])}, {_fmt(c.l0[1])}" + ("" if c.l0_matched else " NOT MATCHED")])
    kl = [c for c in comps if c.metric == "kl_per_token"]
    held = [c.other for c in kl if c.verdict == "holds" and c.l0_matched]
    rev = [c.other for c in kl if c.verdict == "reversed" and c.l0_matched]
    und = [c.other for c in kl if c.verdict == "undecided" and c.l0_matched]
    off = [c.other for c in kl if not c.l0_matched]
    verdicts = [f"The paper's claim, {exp.grid.reference} has lower KL/token than each other architecture at the "
                "same L0:",
                f"holds against {', '.join(held) or 'none'}; reversed against {', '.join(rev) or 'none'}; "
                f"undecided by these data against {', '.join(und) or 'none'}"
                + (f"; not compared (held-out L0 differs by more than 10%): {', '.join(off)}" if off else "") + "."]
    return [Block("h2", "Paired comparisons"), Block("table", (header, lines)),
            Block("p", " ".join(verdicts)),
            Block("p", "Differences are the reference's metric minus the other row's, on the same held-out contexts "
                  f"({comps[0].diff.method}). 'holds' means the interval excludes 0 on the side where the reference is "
                  "better (lower KL and FVU, higher loss recovered); rows whose held-out L0 differ by more than 10% "
                  "are flagged NOT MATCHED and left out of the verdict. Loss recovered zero-ablates each row's own "
                  "layers, so between architectures that write different layers (RouteSAE a routed layer per token, "
                  "the mean-of-layers rows each of their layers in turn) its zero point differs: KL/token and FVU "
                  "compare them like for like, loss recovered does not.")]


def _tokens_label(n: float) -> str:
    """131072 -> '131k', 100000000 -> '100M'."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _budget_text(exp: Experiment) -> str:
    return ("The same seeds trained at " + ", ".join(f"{b:g}" for b in exp.grid.budgets) + " of the full budget, "
            "each a run of its own: the learning rate's schedule (warm-up, constant, decay over the last 20%) is "
            "laid out over each run's own length, so a checkpoint of a longer run is not a shorter run. "
            "Lines are means over seeds, bands the 95% interval over seeds; a hollow point's held-out L0 is more "
            f"than 10% from {exp.grid.reference}'s at that budget (not a like-for-like comparison).")


QUALITY_COLUMNS = {"probe_auc_k1": "probe AUC k1", "probe_auc_k16": "probe AUC k16", "random_auc_k16": "random AUC k16",
                   "dense_auc": "dense AUC", "absorption": "absorption", "full_absorption": "full absorption"}


def _quality_blocks(exp: Experiment, out: Path, results: dict[str, Any]) -> list[Block]:
    """Per SAE, the quality figures of each seed's full-budget SAEs: mean [interval over seeds]."""
    from routesae.quality.results import load_quality, table_row

    figures: dict[str, dict[str, list[float]]] = {}
    for seed in exp.grid.seeds:
        paths = [str(p) for p in (out / "quality" / "probe" / f"seed-{seed}", out / "quality" / "absorption" / f"seed-{seed}")
                 if p.is_dir()]
        if not paths:
            continue
        found = load_quality(paths)
        for f in found.saes.values():
            row = table_row(f.name, f)
            for column in QUALITY_COLUMNS:
                value = row.get(column)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    figures.setdefault(f.name, {}).setdefault(column, []).append(float(value))
    if not figures:
        return []
    columns = [c for c in QUALITY_COLUMNS if any(c in f for f in figures.values())]
    table = []
    for name, values in figures.items():
        line = [name]
        for column in columns:
            if column not in values:
                line.append("-")
                continue
            iv = stats.seed_interval(values[column])
            line.append(_fmt(iv.estimate) + (f" [{_fmt(iv.low)}, {_fmt(iv.high)}]" if math.isfinite(iv.low) else ""))
        table.append(line)
    results["quality"] = figures
    blocks = [Block("h2", "Quality without a judge"), Block("table", (["SAE"] + [QUALITY_COLUMNS[c] for c in columns], table)),
            Block("p", "Mean [95% interval over seeds] of `routesae probe` (sparse probing: test AUC, mean over "
                  "datasets, of k latents picked by class-mean difference; beside k random live latents and a "
                  "probe on the dense residual) and `routesae absorption` (first-letter absorption; weak evidence "
                  "on a model that spells poorly) on each seed's full-budget SAEs.")]
    return blocks + _quality_differences(exp, figures, results)


QUALITY_BETTER = {"probe_auc_k1": "higher", "probe_auc_k16": "higher", "absorption": "lower", "full_absorption": "lower"}
"""The quality columns compared between SAEs, and which way is better."""


def _quality_differences(exp: Experiment, figures: dict[str, dict[str, list[float]]],
                         results: dict[str, Any]) -> list[Block]:
    """The reference minus every other SAE on each quality column: Welch intervals over seeds."""
    ref = exp.grid.reference
    if ref not in figures:
        return []
    lines, found = [], []
    for other, values in figures.items():
        if other == ref:
            continue
        for column, better in QUALITY_BETTER.items():
            if column not in values or column not in figures[ref]:
                continue
            iv = stats.seed_difference(figures[ref][column], values[column])
            v = stats.verdict(iv, better)
            lines.append([f"{ref} - {other}", QUALITY_COLUMNS[column], stats.format_interval(iv.estimate, iv.low, iv.high, 3), v])
            found.append({"reference": ref, "other": other, "metric": column, "difference": iv.estimate,
                          "low": iv.low, "high": iv.high, "method": iv.method, "verdict": v})
    if not lines:
        return []
    results["quality_comparisons"] = found
    return [Block("table", (["comparison", "metric", "difference [95%]", "verdict"], lines)),
            Block("p", f"{ref}'s figure minus the other SAE's, Welch t intervals over the seeds (separate runs, "
                  "so unpaired). 'holds' means the interval excludes 0 on the side where the reference is better "
                  "(higher probe AUC, lower absorption). The SAEs share k; their held-out L0s are in the results table "
                  "at the top.")]


def _links(exp: Experiment, out: Path, folder: Path) -> list[Block]:
    pages = sorted((out / "dashboards").glob("*/index.html"))
    if not pages:
        return []
    return [Block("h2", "Dashboards"),
            Block("ul", [(p.parent.name, _relative(p, folder)) for p in pages])]


def _steering(exp: Experiment, out: Path) -> list[Block]:
    blocks = []
    for i, ex in enumerate(exp.steer, 1):
        path = out / "steer" / f"{i}.json"
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        blocks.append(Block("pre", _steer_text(ex, data)))
    return [Block("h2", "Steering")] + blocks if blocks else []


def _steer_text(ex: dict[str, Any], data: dict[str, Any]) -> str:
    """One steering example as text: the edit (with the latent 'top' resolved), then per prompt the
    continuation without and with it."""
    edits = ", ".join(f"latent {e['latent']} {e['mode']} {e.get('value', '')}".rstrip() for e in data.get("edits", []))
    lines = [f"{data.get('sae', {}).get('name', ex['arch'])} (k {ex['k']}): {edits}"
             + (" (latent 'top': the most frequent interpretable latent on the held-out store)" if ex["latent"] == "top" else "")]
    for r in data.get("results", []):
        lines += ["", f"prompt:   {r['prompt']!r}", f"without:  {r['baseline']['text']!r}", f"steered:  {r['steered']['text']!r}"]
    return "\n".join(lines)


def _provenance(exp: Experiment, stages: list[Stage], out: Path) -> dict[str, Any]:
    from importlib import metadata

    from routesae import __version__

    state = read_state(out)
    code = code_version()
    # a resumed experiment may have run its stages on several commits: each stage's is kept
    ran_on: dict[str, list[str]] = {}
    for s in stages:
        rec = state["stages"].get(s.name) or {}
        ran_on.setdefault(rec.get("code") or "not recorded", []).append(s.name)
    packages = {}
    for name in ("torch", "transformers", "zarr", "numpy", "scipy", "scikit-learn"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "routesae": __version__, "report_code": code, "stages_ran_on": {c: len(n) for c, n in ran_on.items()},
        "stage_code": {n: c for c, names in ran_on.items() for n in names}, "packages": packages,
        "python": sys.version.split()[0], "machine": {"platform": platform.platform(), "cpu": _cpu_name(),
                                                      "node": platform.node()},
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "experiment_file": exp.source,
        "stage_seconds": {s.name: (state["stages"].get(s.name) or {}).get("seconds") for s in stages},
    }


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() is often empty there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ------------------------------------------------------------------------------------------- plots

def _plots(exp: Experiment, runs: dict, per_budget: dict[float, dict[str, dict[str, Cell]]],
           folder: Path, unmatched: set[tuple[float, str]] = frozenset()) -> dict[str, Path | None]:
    """unmatched: (budget, row) whose held-out L0 is more than 10% from the reference's (hollow points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, Path | None] = {"sparsity": None, "budget": None, "routing": None}
    first = next(iter(runs.values())).rows if runs else {}
    whole = {n: c for n, c in per_budget[exp.grid.budgets[-1]].items() if "l0" in c and not is_layer_row(first.get(n, {}))}
    metrics = [m for m in CURVE_METRICS if any(m in c for c in whole.values())]
    if whole and metrics:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
        by_arch: dict[str, list[str]] = {}
        for name in whole:
            by_arch.setdefault(_arch_of(runs, name), []).append(name)
        for ax, metric in zip(axes[0], metrics):
            for arch, names in by_arch.items():
                pts = [(whole[n]["l0"].seeds.estimate, whole[n][metric].seeds) for n in names if metric in whole[n]]
                if not pts:
                    continue
                pts.sort(key=lambda p: p[0])
                x = [p[0] for p in pts]
                y = [p[1].estimate for p in pts]
                err = [[max(0.0, p[1].estimate - p[1].low) if math.isfinite(p[1].low) else 0 for p in pts],
                       [max(0.0, p[1].high - p[1].estimate) if math.isfinite(p[1].high) else 0 for p in pts]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arch)
            ax.set_xlabel("held-out L0")
            ax.set_ylabel(LABEL[metric] + (" (higher is better)" if BETTER[metric] == "higher" else " (lower is better)"))
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        figures["sparsity"] = save_figure(fig, folder / "sparsity_fidelity.png")

    if len(exp.grid.budgets) > 1:
        figures["budget"] = _budget_figure(plt, exp, runs, per_budget, folder, unmatched)
    figures["routing"] = _routing_figure(plt, exp, runs, folder)
    return figures


def _arch_of(runs: dict, name: str) -> str:
    for run in runs.values():
        if name in run.rows:
            row = run.rows[name]
            return str(row.get("arch"))
    return name


def _budget_figure(plt, exp: Experiment, runs: dict, per_budget: dict[float, dict[str, dict[str, Cell]]],
                   folder: Path, unmatched: set[tuple[float, str]]) -> Path | None:
    from routesae.reproduce.stages import _budget_option

    rows = runs[max(runs)].rows
    names = [n for n in row_names(runs, exp.grid.budgets[-1]) if not is_layer_row(rows.get(n, {}))]
    metrics = [m for m in CURVE_METRICS if any(m in per_budget[exp.grid.budgets[-1]].get(n, {}) for n in names)]
    if not names or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name in names:
            arch = _arch_of(runs, name)
            xs, ys, lo, hi, hollow = [], [], [], [], []
            for b in exp.grid.budgets:
                cell = per_budget[b].get(name, {}).get(metric)
                if cell is None:
                    continue
                hollow.append((b, name) in unmatched)
                xs.append(_budget_option(exp, arch if arch in exp.grid.archs else exp.grid.archs[0], b)[1])
                ys.append(cell.seeds.estimate)
                lo.append(cell.seeds.low if math.isfinite(cell.seeds.low) else cell.seeds.estimate)
                hi.append(cell.seeds.high if math.isfinite(cell.seeds.high) else cell.seeds.estimate)
            if xs:
                line = ax.plot(xs, ys, marker="o", label=name)[0]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.18)
                off = [(x, y) for x, y, h in zip(xs, ys, hollow) if h]
                if off:  # its L0 is not the reference's there: not a like-for-like point
                    ax.plot(*zip(*off), linestyle="none", marker="o", color=line.get_color(), markerfacecolor="white",
                            markeredgecolor=line.get_color(), markersize=7, zorder=3)
        ax.set_xscale("log")
        ticks = sorted({_budget_option(exp, exp.grid.archs[0], b)[1] for b in exp.grid.budgets})
        ax.set_xticks(ticks, [_tokens_label(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training tokens")
        ax.set_ylabel(LABEL[metric])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return save_figure(fig, folder / "budget_curve.png")


def _routing_figure(plt, exp: Experiment, runs: dict, folder: Path) -> Path | None:
    key = (exp.grid.budgets[-1], exp.grid.seeds[0])
    run = runs.get(key)
    if run is None:
        return None
    routed = {n: r for n, r in run.routing.items() if run.rows.get(n, {}).get("arch") == "routesae"}
    if not routed:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(routed)
    for i, (name, r) in enumerate(routed.items()):
        layers = np.asarray(r["layers"], dtype=float)
        ax.bar(layers + (i - (len(routed) - 1) / 2) * width, r["fraction"], width=width, label=name)
    ax.set_xlabel("layer (hidden_states index)")
    ax.set_ylabel("share of tokens")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, folder / "routing.png")


# ------------------------------------------------------------------------------------------- rendering

def _relative(path: Path, folder: Path) -> str:
    import os

    return os.path.relpath(path, folder)


def _markdown(title: str, blocks: list[Block], folder: Path) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            out += [f"## {b.data}", ""]
        elif b.kind == "p":
            out += [b.data, ""]
        elif b.kind == "table":
            header, rows = b.data
            out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]
        elif b.kind == "img":
            out += [f"![{b.data.stem}]({_relative(b.data, folder)})", ""]
        elif b.kind == "pre":
            out += ["```", b.data, "```", ""]
        elif b.kind == "ul":
            out += [f"- [{text}]({href})" for text, href in b.data] + [""]
    return "\n".join(out)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
       "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
       "img{max-width:100%}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:12px}")


def _html(title: str, blocks: list[Block]) -> str:
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for b in blocks:
        if b.kind == "h2":
            body.append(f"<h2>{esc(b.data)}</h2>")
        elif b.kind == "p":
            body.append(f"<p>{esc(b.data)}</p>")
        elif b.kind == "table":
            header, rows = b.data
            body.append("<table><thead><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                        + "</tbody></table>")
        elif b.kind == "img":
            data = base64.b64encode(Path(b.data).read_bytes()).decode()
            body.append(f'<p><img alt="{esc(b.data.stem)}" src="data:image/png;base64,{data}"></p>')
        elif b.kind == "pre":
            body.append(f"<pre>{esc(b.data)}</pre>")
        elif b.kind == "ul":
            body.append("<ul>" + "".join(f'<li><a href="{esc(href)}">{esc(text)}</a></li>' for text, href in b.data)
                        + "</ul>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _cell_json(c: Cell) -> dict[str, Any]:
    out = {"mean": c.seeds.estimate, "low": c.seeds.low, "high": c.seeds.high, "seeds": c.seeds.n,
           "method": c.seeds.method}
    if c.contexts is not None:
        out["contexts"] = {"estimate": c.contexts.estimate, "low": c.contexts.low, "high": c.contexts.high,
                           "method": c.contexts.method}
    return out


def _comparison_json(c: Comparison) -> dict[str, Any]:
    return {"reference": c.reference, "other": c.other, "metric": c.metric, "difference": c.diff.estimate,
            "low": c.diff.low, "high": c.diff.high, "method": c.diff.method, "verdict": c.verdict,
            "l0_matched": c.l0_matched, "l0": list(c.l0)}
