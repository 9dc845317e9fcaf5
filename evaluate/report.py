"""The eval report: one row per evaluated target, as markdown, JSON, CSV, and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routesae.atomic_files import save_figure, write_text
from routesae.evaluate.cache_eval import CacheResult
from routesae.evaluate.splice import SpliceResult
from routesae.json_values import jsonable

# (key, markdown header, format) of the table's columns, in order
COLUMNS = [
    ("name", "SAE", "{}"),
    ("arch", "arch", "{}"),
    ("layers", "layer(s)", "{}"),
    ("k", "k", "{}"),
    ("latents", "latents", "{}"),
    ("l0", "L0", "{:.1f}"),
    ("normmse", "NormMSE", "{:.4f}"),
    ("fvu", "FVU", "{:.4f}"),
    ("dead_fraction", "dead", "{:.3f}"),
    ("kl_per_token", "KL/token (nats)", "{:.4f}"),
    ("kl_per_context", "KL/context (paper)", "{:.2f}"),
    ("delta_ce", "delta-CE", "{:.4f}"),
    ("loss_recovered", "loss rec.", "{:.3f}"),
]


@dataclass
class Row:
    """One evaluated target: an SAE, or a RouteSAE under a baseline routing."""

    name: str
    """Display name: the SAE folder's name, plus [uniform] / [random-layer] for baselines."""
    path: str
    """The SAE folder."""
    arch: str
    """The architecture's registered name."""
    routing: str
    """'router' (the SAE's own), 'uniform' or 'random-layer'; '-' for single-layer SAEs; 'layer' for a
    multi-layer SAE's per-layer row, 'mean' for the mean of those."""
    layers: list[int]
    """hidden_states indices the SAE reads."""
    k: int
    latents: int
    cache: CacheResult
    splice: SpliceResult | None = None
    splice_note: str | None = None
    """Why splice metrics are missing, when they are."""
    layer_of: str | None = None
    """For a multi-layer SAE evaluated one layer at a time (MLSAE): the SAE's name, on each
    per-layer row and on the row of their mean."""
    l0_target: float | None = None
    """The L0 the SAE was fitted for, where its L0 may drift from it (vanilla, gated, jumprelu)."""

    def flat(self) -> dict[str, Any]:
        """The table's values (NaN where not measured)."""
        nan = math.nan
        s = self.splice
        return {
            "name": self.name,
            "arch": self.arch if self.routing in ("router", "-", "layer") else f"{self.arch}/{self.routing}",
            "routing": self.routing,
            "layers": _layers_str(self.layers),
            "k": self.k,
            "latents": self.latents,
            "l0": self.cache.l0,
            "normmse": self.cache.normmse,
            "fvu": self.cache.fvu,
            "dead_fraction": self.cache.dead_fraction,
            "kl_per_token": s.kl_per_token if s else nan,
            "kl_per_context": s.kl_per_context if s else nan,
            "ce_clean": s.ce_clean if s else nan,
            "ce_spliced": s.ce_spliced if s else nan,
            "ce_zero": s.ce_zero if s else nan,
            "delta_ce": s.delta_ce if s else nan,
            "loss_recovered": s.loss_recovered if s else nan,
        }


def layer_mean_row(name: str, rows: list[Row]) -> Row:
    """The mean over a multi-layer SAE's per-layer rows of every figure (each layer spliced alone:
    splicing all at once would collapse to the deepest layer's replacement). Counts are summed."""
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    caches = [r.cache for r in rows]
    cache = caches[0]._replace(
        normmse=mean([c.normmse for c in caches]), fvu=mean([c.fvu for c in caches]), l0=mean([c.l0 for c in caches]),
        dead_fraction=mean([c.dead_fraction for c in caches]), routing=None)
    splice = None
    if all(r.splice is not None for r in rows):
        sp = [r.splice for r in rows]
        fields = ("kl_per_token", "kl_per_context", "ce_clean", "ce_spliced", "ce_zero", "delta_ce", "loss_recovered")
        replaced: dict[int, int] = {}
        for one in sp:
            for layer, count in one.replaced_per_layer.items():
                replaced[layer] = replaced.get(layer, 0) + count
        splice = sp[0]._replace(**{f: mean([getattr(one, f) for one in sp]) for f in fields},
                                replaced_per_layer=replaced)
    first = rows[0]
    return Row(f"{name} (mean of {len(rows)} layers)", first.path, first.arch, "mean",
               sorted({x for r in rows for x in r.layers}), first.k, first.latents, cache, splice,
               first.splice_note, layer_of=name)


def _layers_str(layers: list[int]) -> str:
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


@dataclass
class Report:
    """Everything eval measured, and on what."""

    cache: str
    """The store evaluated on."""
    model: dict[str, Any]
    """The store's model provenance."""
    token_range: tuple[int, int]
    """Store tokens [start, stop) evaluated (whole contexts)."""
    held_out: bool
    """True: the SAEs' held-out tail; False: --all-tokens."""
    n_tokens: int
    """Non-special tokens the cache metrics ran on."""
    context_len: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Definitions and caveats printed under the table."""
    warnings: list[str] = field(default_factory=list)
    """What is off with an SAE itself (an L0 far from its target), one line each; also in `notes`."""
    splice_batches: dict[str, int] | None = None
    """Splice batches whose clean prefix was computed live / taken from the store (None: no splice)."""
    per_context: Any = None  # evaluate.per_context.PerContext: additive sums per held-out context (per_context.npz)
    quality: list[dict[str, Any]] = field(default_factory=list)
    """The Quality table (eval --quality): one flat dict per row with figures (quality/results.py's table_row)."""

    # --- renderings ----------------------------------------------------------------------------
    def markdown(self) -> str:
        out = io.StringIO()
        a, b = self.token_range
        where = "held-out tail" if self.held_out else "whole store (--all-tokens)"
        out.write(f"eval on {self.cache}: tokens {a:,}..{b:,} ({where}; {(b - a) // self.context_len} contexts "
                  f"of {self.context_len}, {self.n_tokens:,} non-special tokens), model {self.model.get('id')}\n\n")
        out.write("| " + " | ".join(h for _, h, _ in COLUMNS) + " |\n")
        out.write("|" + "|".join("---" if k in ("name", "arch", "layers") else "---:" for k, _, _ in COLUMNS) + "|\n")
        for row in self.rows:
            flat = row.flat()
            cells = []
            for key, _, fmt in COLUMNS:
                v = flat[key]
                cells.append("-" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
            out.write("| " + " | ".join(cells) + " |\n")
        if self.quality:
            out.write("\n" + quality_markdown(self.quality))
        if self.notes:
            out.write("\n")
            for note in self.notes:
                out.write(f"- {note}\n")
        return out.getvalue()

    def to_json(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            d = {
                "name": row.name, "path": row.path, "arch": row.arch, "routing": row.routing,
                "layers": row.layers, "k": row.k, "latents": row.latents,
                "cache": jsonable(row.cache._asdict()),
                "splice": jsonable(row.splice._asdict()) if row.splice else None,
                "splice_note": row.splice_note,
                "layer_of": row.layer_of,
                "l0_target": row.l0_target,
            }
            rows.append(d)
        return jsonable({
            "cache": self.cache, "model": self.model, "token_range": list(self.token_range),
            "held_out": self.held_out, "n_tokens": self.n_tokens, "context_len": self.context_len,
            "table": [r.flat() for r in self.rows], "rows": rows, "notes": self.notes, "warnings": self.warnings,
            "splice_batches": self.splice_batches, "quality": self.quality,
        })

    def csv(self) -> str:
        out = io.StringIO()
        flats = [r.flat() for r in self.rows]
        keys = list(flats[0]) if flats else [k for k, _, _ in COLUMNS]
        w = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        for f in flats:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in f.items()})
        return out.getvalue()

    # --- files ---------------------------------------------------------------------------------
    def write_json(self, path: str | os.PathLike) -> None:
        write_text(Path(path), json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")

    def write_csv(self, path: str | os.PathLike) -> None:
        write_text(Path(path), self.csv())

    def write_markdown(self, path: str | os.PathLike) -> None:
        write_text(Path(path), self.markdown())

    def plot(self, folder: str | os.PathLike) -> list[Path]:
        """PNG plots into `folder`, each answering one question: where RouteSAEs route their tokens
        (routing.png), how often latents fire (firing.png), and, when some architecture was given at
        several sparsities, what sparsity buys (metrics_vs_l0.png). Returns the files written."""
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        routed = [r for r in self.rows if r.cache.routing is not None]
        if routed:
            written.append(_save(_routing_figure(plt, routed), folder / "routing.png"))
        own = [r for r in self.rows if r.routing in ("router", "-", "mean")]  # baselines share their SAE's dictionary
        if own:
            written.append(_save(_firing_figure(plt, own), folder / "firing.png"))
        figure = _sparsity_figure(plt, [r for r in self.rows if r.routing != "layer"])
        if figure is not None:
            written.append(_save(figure, folder / "metrics_vs_l0.png"))
        return written


def _routing_figure(plt, rows: list[Row]):
    """Bars for each RouteSAE's own router; the random baselines, flat by construction, as dashed lines."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    routers = [r for r in rows if r.routing == "router"]
    baselines = [r for r in rows if r.routing != "router"]
    layers = rows[0].cache.routing.layers
    width = 0.8 / max(len(routers), 1)
    for i, r in enumerate(routers):
        dist = r.cache.routing
        xs = [x + (i - (len(routers) - 1) / 2) * width for x in range(len(layers))]
        label = f"{r.name} ({dist.mode} routing)"
        axes[0, 0].bar(xs, dist.fraction, width=width, label=label)
        axes[0, 1].bar(xs, [0 if math.isnan(w) else w for w in dist.chosen_weight], width=width, label=label)
    styles = {"uniform": ":", "random-layer": "--"}
    seen: set[str] = set()
    for r in baselines:
        if r.routing in seen:
            continue
        seen.add(r.routing)
        dist = r.cache.routing
        p = [w for w in dist.chosen_weight if not math.isnan(w)]
        axes[0, 0].axhline(1 / len(layers), color="gray", linestyle=styles.get(r.routing, "-."),
                           label=f"[{r.routing}] baseline: 1/{len(layers)} of tokens per layer")
        if p:
            axes[0, 1].axhline(sum(p) / len(p), color="gray", linestyle=styles.get(r.routing, "-."),
                               label=f"[{r.routing}] baseline: p = {sum(p) / len(p):.3g}")
    titles = ("share of tokens routed to each layer (arg-max of the router)",
              "mean weight p of the chosen layer, over the tokens routed there")
    for ax, title, ylabel in zip(axes[0], titles, ("fraction of tokens", "p")):
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("layer (hidden_states index)")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    if any(r.cache.routing.mode == "soft" for r in routers):
        fig.text(0.5, 0.005, "soft routing: the coder's input mixes all layers; the bars count each token's "
                 "highest-weighted layer", ha="center", fontsize=8)
    return fig


def _firing_figure(plt, rows: list[Row]):
    """Left: the log10 firing frequencies of the latents that fired; right: the share that never did."""
    fig, (ax, dead_ax) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    lowest = 0.0
    for r in rows:
        h = r.cache.firing
        centers = [(a + b) / 2 for a, b in zip(h.edges[:-1], h.edges[1:])]
        ax.step(centers, h.counts, where="mid", label=r.name)
        nonzero = [e for e, c in zip(h.edges[:-1], h.counts) if c]
        if nonzero:
            lowest = min(lowest, nonzero[0])
    ax.set_xlim(lowest - 0.25, 0.05)  # fitted to the latents that fired, not to the bins' range
    ax.set_xlabel("log10 of the fraction of tokens a latent fires on")
    ax.set_ylabel("latents")
    ax.set_title("how often the latents that fired did", fontsize=10)
    ax.legend(fontsize=7)
    names = [r.name for r in rows]
    dead = [r.cache.dead_fraction for r in rows]
    dead_ax.barh(range(len(rows)), dead, color=[f"C{i % 10}" for i in range(len(rows))])
    dead_ax.set_yticks(range(len(rows)), names, fontsize=7)
    dead_ax.invert_yaxis()
    dead_ax.set_xlim(0, max(max(dead) * 1.15, 0.01))
    dead_ax.set_xlabel("fraction of latents")
    dead_ax.set_title("never fired (dead)", fontsize=10)
    return fig


# what sparsity buys: metrics comparable across architectures (NormMSE is not: its space differs)
SPARSITY_METRICS = [("fvu", "FVU (model space)"), ("kl_per_token", "KL per token (nats)"),
                    ("loss_recovered", "loss recovered")]


def _sparsity_figure(plt, rows: list[Row]):
    """FVU, KL and loss recovered against L0, one line per architecture (and baseline); None unless
    some architecture has rows at two sparsities or more."""
    groups: dict[str, list[Row]] = defaultdict(list)
    folders = {Path(r.path).parent.name for r in rows}  # SAEs of several fits: keep each fit's lines apart
    for r in rows:
        label = r.arch if r.routing in ("router", "-", "mean") else f"{r.arch}/{r.routing}"
        fit_name = f"{Path(r.path).parent.name}: " if len(folders) > 1 else ""
        groups[f"{fit_name}{label} @{_layers_str(r.layers)}"].append(r)
    if not any(len({round(r.cache.l0, 1) for r in rs}) > 1 for rs in groups.values()):
        return None
    metrics = [(key, title) for key, title in SPARSITY_METRICS
               if any(not math.isnan(r.flat()[key]) for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False)
    colors = plt.get_cmap("tab20").colors  # ten architectures and their baselines: no colour twice
    for n, (label, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r.cache.l0)
        for ax, (key, _) in zip(axes[0], metrics):
            pts = [(r.cache.l0, r.flat()[key]) for r in rs if not math.isnan(r.flat()[key])]
            if pts:
                ax.plot(*zip(*pts), marker="osD^v"[n % 5], color=colors[n % len(colors)], label=label)
    for ax, (key, title) in zip(axes[0], metrics):
        if key == "kl_per_token":
            ax.set_yscale("log")  # a collapsed SAE or a degenerate baseline sits orders of magnitude up
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("L0 (active latents per token)")
        ax.legend(fontsize=7)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# (key, header) of the Quality table; the probe's k columns say which k was probed where 1 or 16 was not
QUALITY_COLUMNS = [("probe_auc_k1", "probe AUC k1"), ("probe_auc_k16", "probe AUC k16"), ("dense_auc", "dense AUC"),
                   ("absorption", "absorption"), ("full_absorption", "full absorption"), ("mcc", "MCC"),
                   ("recovered", "recovered")]


def quality_markdown(rows: list[dict[str, Any]]) -> str:
    """The Quality table under the main one (figures from routesae probe, absorption, synth-score)."""
    out = ["Quality", "", "| SAE | " + " | ".join(h for _, h in QUALITY_COLUMNS) + " |",
           "|---|" + "---:|" * len(QUALITY_COLUMNS)]
    for r in rows:
        cells = []
        for key, _ in QUALITY_COLUMNS:
            v = r.get(key)
            text = "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
            want = {"probe_auc_k1": 1, "probe_auc_k16": 16}.get(key)
            k = r.get(key.replace("_auc", ""))
            if v is not None and want is not None and k is not None and k != want:
                text += f" (k={k})"
            cells.append(text)
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
