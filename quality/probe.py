"""k-sparse probing of SAEs on a labelled store (quality/probe_store.py), with its baselines.

Per dataset, per SAE and per k (default 1, 2, 4, 8, 16, 32), as the sae-probes benchmark does it:
- the SAE's dense code of each prompt's stored last-token residual (`sae.encode`);
- k latents picked on the training split alone: each latent divided by its mean |value| over the
  training prompts where it is non-zero, then ranked by |mean over positives - mean over
  negatives|; latents that never fire on the training split are never picked;
- a logistic regression (scikit-learn, L2, lbfgs, max_iter 1000, no scaling of the codes) on those
  k latents; its C from logspace(5, -5, 10) by the AUC on the training split's last
  min(20%, 100) prompts (the benchmark's rule for 128 prompts or more, used here for any size),
  then refitted on the whole training split; reported: test AUC (the benchmark's metric), test
  accuracy, validation AUC. The benchmark's README uses L1 probes; on k <= 32 chosen latents the
  penalty matters little, and lbfgs is many times faster than saga on a CPU.

Baselines in the same table: k random latents among those that fire on the training split
(seeded by --seed, the dataset and k: the same draw for every SAE of one width), and a logistic
regression on the dense residual at the SAE's layer (standardized by the training split's mean
and deviation, for lbfgs to converge; C searched as above). The dense probe of a dataset and layer
is fitted once and shared by every SAE reading that layer.

Which code each architecture is probed on:
- single-layer SAEs (topk, batchtopk, matryoshka, vanilla, gated, jumprelu): their code of their
  layer; the dense baseline at that layer;
- RouteSAE: its routed code (the router picks the layer per prompt from all routed layers);
  crosscoder: its one code, read from all its layers at once. Their dense baseline is the best of
  their layers, picked per dataset by validation AUC (each layer's is in probe.json);
- MLSAE: its code of each of its layers on its own (one row per layer), and "best layer": per
  dataset and k, the layer of highest validation AUC (never the test AUC), reported as the SAE's
  figure. Its random baseline is picked the same way.
"""

from __future__ import annotations

import math
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from routesae.atomic_files import write_json, write_text
from routesae.errors import RouteSAEError

DEFAULT_KS = (1, 2, 4, 8, 16, 32)
C_GRID = tuple(float(c) for c in np.logspace(5, -5, 10))
"""The benchmark's inverse regularization strengths, strongest last."""
HEADLINE_KS = (1, 16)
"""The ks the terminal line and the eval report's quality table show (the largest k where 16 is absent)."""


@dataclass
class ProbeConfig:
    """What `routesae probe` takes."""

    store: str
    """The labelled store (`routesae probe-data`)."""
    saes: list[str]
    """SAE folders (a fit output folder stands for every SAE in it)."""
    out: str
    """Folder for probe.json and probe.md."""
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    """Latents per sparse probe."""
    datasets: list[str] | None = None
    """Datasets of the store to probe (default: all)."""
    seed: int = 0
    """Seed of the random-latent baseline."""
    device: str = "auto"
    """Where the SAEs encode: 'auto' (CUDA if present), 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show a bar per dataset."""


class Score(NamedTuple):
    """One fitted probe."""

    auc: float
    """Test AUC (0.5 where nothing could be fitted: no live latent)."""
    acc: float
    """Test accuracy at the probe's own threshold."""
    val_auc: float
    """AUC on the held-back end of the training split at the chosen C (nan where it had one class)."""
    c: float
    """The chosen C."""


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else math.nan


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              cs: tuple[float, ...] = C_GRID) -> Score:
    """A logistic regression on x_train, C chosen on the training split's last min(20%, 100) rows,
    refitted on all of it; scored on the test split."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if x_train.shape[1] == 0:
        return Score(0.5, 0.5, math.nan, math.nan)
    n_val = min(int(0.2 * len(y_train)), 100)
    fit_y, val_y = y_train[:-n_val], y_train[-n_val:]
    best_c, best_val = 1.0, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if n_val >= 2 and 0 < val_y.sum() < n_val and 0 < fit_y.sum() < len(fit_y):
            for c in cs:
                model = LogisticRegression(C=c, max_iter=1000).fit(x_train[:-n_val], fit_y)
                val = _auc(val_y, model.decision_function(x_train[-n_val:]))
                if math.isnan(best_val) or val > best_val:
                    best_c, best_val = c, val
        model = LogisticRegression(C=best_c, max_iter=1000).fit(x_train, y_train)
    score = model.decision_function(x_test)
    return Score(_auc(y_test, score), float(((score > 0) == (y_test == 1)).mean()), best_val, best_c)


def rank_latents(z_train: np.ndarray, y_train: np.ndarray) -> np.ndarray:
    """Latents that fire on the training split, best first: each divided by its mean |value| where
    non-zero, ranked by |mean over positives - mean over negatives| (ties: lower index first)."""
    fired = z_train != 0
    count = fired.sum(0)
    live = count > 0
    scale = np.where(live, np.abs(z_train).sum(0) / np.maximum(count, 1), 1.0)
    zn = z_train / scale
    diff = np.abs(zn[y_train == 1].mean(0) - zn[y_train == 0].mean(0))
    order = np.argsort(-diff, kind="stable")
    return order[live[order]]


def random_latents(z_train: np.ndarray, k: int, seed: int, dataset: str) -> np.ndarray:
    """k latents drawn among those that fire on the training split (fewer where fewer fire)."""
    live = np.flatnonzero((z_train != 0).any(0))
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode()), k])
    return np.sort(rng.choice(live, size=min(k, len(live)), replace=False))


def code_kind(sae: torch.nn.Module) -> str:
    """Which code the SAE is probed on: 'single', 'routed', 'crosscoder' or 'per-layer' (MLSAE)."""
    if hasattr(sae, "at_layer"):
        return "per-layer"
    if hasattr(sae, "route"):
        return "routed"
    return "crosscoder" if getattr(sae, "multi_layer", False) else "single"


CODE_WORDS = {"single": "its layer's code", "routed": "routed code", "crosscoder": "its one code",
              "per-layer": "per layer; best layer by validation AUC"}


def encode_codes(sae: torch.nn.Module, acts: dict[int, torch.Tensor]) -> np.ndarray:
    """[n, n_codes, n_latents] float32: the SAE's dense codes of n prompts; n_codes is 1 but for
    MLSAE (one code per layer, in the order of its layers)."""
    from routesae.interpret.codes import sae_input

    x = sae_input(sae, acts)
    n = x.shape[0]
    z = sae.encode(x).float().cpu().numpy()
    return z.reshape(n, -1, sae.config.n_latents)


def _score_row(score: Score) -> dict[str, float | None]:
    def num(v: float) -> float | None:
        return None if math.isnan(v) else round(v, 6)

    return {"auc": num(score.auc), "acc": num(score.acc), "val_auc": num(score.val_auc), "C": num(score.c)}


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Of rows for several layers, the one of highest validation AUC (the first layer on ties or nan)."""
    return max(rows, key=lambda r: -1.0 if r["val_auc"] is None else r["val_auc"])


class DatasetActs(NamedTuple):
    """One dataset's stored last-token residuals, its training split's rows first."""

    name: str
    acts: dict[int, torch.Tensor]
    """layer -> [n_train + n_test, d_model] float32 (CPU): the training rows, then the test rows."""
    y_train: np.ndarray
    y_test: np.ndarray

    @property
    def n_train(self) -> int:
        return len(self.y_train)


def read_dataset(store: Any, index: int, layers: list[int]) -> DatasetActs:
    """One dataset's residuals at `layers`: one read per layer, rows ascending, put back in
    train-then-test order."""
    train, test = store.rows(index, "train"), store.rows(index, "test")
    rows = np.concatenate([train, test])
    order = np.argsort(rows, kind="stable")
    acts: dict[int, torch.Tensor] = {}
    for layer in layers:
        block = store.acts(layer, rows[order])
        acts[layer] = torch.empty_like(block)
        acts[layer][torch.from_numpy(order)] = block
    return DatasetActs(store.datasets[index]["name"], acts, store.labels[train], store.labels[test])


def dense_row(data: DatasetActs, layer: int) -> dict[str, Any]:
    """The dense baseline of one dataset at one layer (standardized by the training split)."""
    x = data.acts[layer].numpy()
    n_train = data.n_train
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    xs = (x - mean) / std
    return {"sae": None, "dataset": data.name, "method": "dense", "layer": layer, "k": None,
            **_score_row(fit_probe(xs[:n_train], data.y_train, xs[n_train:], data.y_test))}


def sae_codes(sae: torch.nn.Module, data: DatasetActs, device: torch.device) -> np.ndarray:
    """The probe's encode pass for one SAE on one dataset: its layers' residuals moved to `device`,
    the whole dataset encoded at once (`encode_codes`)."""
    return encode_codes(sae, {layer: data.acts[layer].to(device) for layer in sae.config.layers})


def sae_rows(data: DatasetActs, s: Any, codes: np.ndarray, ks: list[int], seed: int,
             step: Callable[[], object] = lambda: None) -> list[dict[str, Any]]:
    """The SAE's and the random baseline's probes of one dataset, per code (MLSAE: per layer) and
    k, from the SAE's codes (`sae_codes`); `step` is called after each code and k."""
    n_train, y_train, y_test = data.n_train, data.y_train, data.y_test
    kind = code_kind(s.sae)
    code_layers: list[int | None] = list(s.sae.config.layers) if kind == "per-layer" else [None]
    out: list[dict[str, Any]] = []
    for c, layer in enumerate(code_layers):
        z = codes[:, c]
        ranked = rank_latents(z[:n_train], y_train)
        for k in ks:
            picked = ranked[:k]
            score = fit_probe(z[:n_train][:, picked], y_train, z[n_train:][:, picked], y_test)
            out.append({"sae": s.name, "dataset": data.name, "method": "sae", "layer": layer, "k": k,
                        "latents": [int(i) for i in picked], **_score_row(score)})
            drawn = random_latents(z[:n_train], k, seed, data.name)
            score = fit_probe(z[:n_train][:, drawn], y_train, z[n_train:][:, drawn], y_test)
            out.append({"sae": s.name, "dataset": data.name, "method": "random", "layer": layer, "k": k,
                        "latents": [int(i) for i in drawn], **_score_row(score)})
            step()
    return out


def probe_dataset(store: Any, index: int, saes: list[Any], ks: list[int], seed: int, device: torch.device,
                  progress: bool) -> list[dict[str, Any]]:
    """Every row of one dataset: dense baselines per layer, SAE and random probes per SAE and k."""
    layers = sorted({layer for s in saes for layer in s.sae.config.layers})
    data = read_dataset(store, index, layers)
    steps = len(layers) + sum(len(s.sae.config.layers if code_kind(s.sae) == "per-layer" else [0]) * len(ks)
                              for s in saes)
    bar = tqdm(total=steps, desc=data.name, disable=not progress, dynamic_ncols=True, leave=False)
    out: list[dict[str, Any]] = []
    for layer in layers:
        out.append(dense_row(data, layer))
        bar.update()
    for s in saes:
        out += sae_rows(data, s, sae_codes(s.sae, data, device), ks, seed, bar.update)
    bar.close()
    return out


def headline_rows(rows: list[dict[str, Any]], s: Any, dataset: str) -> dict[str, Any]:
    """The figures that stand for one SAE on one dataset: per k its probe and random baseline (an
    MLSAE's best layer by validation AUC), and its dense baseline (a multi-layer SAE's best layer)."""
    mine = [r for r in rows if r["dataset"] == dataset]
    result: dict[str, Any] = {"sae": {}, "random": {}, "sae_layer": {}}
    for method in ("sae", "random"):
        for k in sorted({r["k"] for r in mine if r["sae"] == s.name}):
            cands = [r for r in mine if r["sae"] == s.name and r["method"] == method and r["k"] == k]
            best = _best(cands)
            result[method][k] = best["auc"]
            if method == "sae" and best["layer"] is not None:
                result["sae_layer"][k] = best["layer"]
    dense = [r for r in mine if r["method"] == "dense" and r["layer"] in s.sae.config.layers]
    best = _best(dense)
    result["dense"], result["dense_layer"] = best["auc"], best["layer"]
    return result


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(float(np.mean(got)), 6) if got else None


def summarize(rows: list[dict[str, Any]], s: Any, datasets: list[str], ks: list[int]) -> dict[str, Any]:
    per = {d: headline_rows(rows, s, d) for d in datasets}
    return {
        "sae": {k: _mean([per[d]["sae"].get(k) for d in datasets]) for k in ks},
        "random": {k: _mean([per[d]["random"].get(k) for d in datasets]) for k in ks},
        "dense": _mean([per[d]["dense"] for d in datasets]),
        "per_dataset": per,
    }


def headline_ks(ks: list[int]) -> list[int]:
    """k 1 and 16 where probed, else the smallest and largest."""
    shown = [k for k in HEADLINE_KS if k in ks]
    return shown if len(shown) == 2 else sorted({min(ks), max(ks)})


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def terminal_line(name: str, summary: dict[str, Any], ks: list[int], n_datasets: int) -> str:
    shown = headline_ks(ks)
    sae = ", ".join(f"k={k} {_f(summary['sae'][k])}" for k in shown)
    return (f"{name}: probing AUC {sae} (random latents k={shown[-1]} {_f(summary['random'][shown[-1]])}, "
            f"dense {_f(summary['dense'])}) over {n_datasets} dataset{'s' * (n_datasets != 1)}")


def markdown(result: dict[str, Any]) -> str:
    ks = result["ks"]
    lines = [f"# Sparse probing: {result['store']}", "",
             f"{len(result['datasets'])} datasets, test AUC (mean over datasets); k latents picked on the training "
             "split by the normalized class-mean difference, logistic regression on them; random: k random live "
             "latents; dense: logistic regression on the residual at the SAE's layer (multi-layer SAEs: the "
             "best of their layers by validation AUC).", "",
             "| SAE | code | " + " | ".join(f"k={k}" for k in ks) + " | dense |",
             "|---|---|" + "---:|" * (len(ks) + 1)]
    for s in result["saes"]:
        sm = s["summary"]
        lines.append(f"| {s['name']} | {s['code']} | " + " | ".join(_f(sm["sae"][k]) for k in ks)
                     + f" | {_f(sm['dense'])} |")
        lines.append(f"| {s['name']} random | | " + " | ".join(_f(sm["random"][k]) for k in ks) + " | |")
    for s in result["saes"]:
        lines += ["", f"## {s['name']} per dataset", "",
                  "| dataset | dense | " + " | ".join(f"k={k}" for k in ks) + f" | random k={ks[-1]} |",
                  "|---|---:|" + "---:|" * (len(ks) + 1)]
        for d, per in s["summary"]["per_dataset"].items():
            lines.append(f"| {d} | {_f(per['dense'])} | " + " | ".join(_f(per["sae"].get(k)) for k in ks)
                         + f" | {_f(per['random'].get(ks[-1]))} |")
    return "\n".join(lines) + "\n"


def run_probe(cfg: ProbeConfig) -> tuple[dict[str, Any], Path]:
    """Probe every SAE on every chosen dataset of the store; write probe.json and probe.md into
    cfg.out; -> (result, out folder)."""
    from routesae.model.loading import resolve_device
    from routesae.quality.probe_store import LabelledStore
    from routesae.sae_folders import check_compatible, expand_sae_paths, load_saes

    ks = sorted(set(cfg.ks))
    if not ks or ks[0] < 1:
        raise RouteSAEError("--k takes whole numbers of at least 1")
    store = LabelledStore.open(cfg.store)
    names = [d["name"] for d in store.datasets]
    chosen = names if not cfg.datasets else cfg.datasets
    unknown = [d for d in chosen if d not in names]
    if unknown:
        raise RouteSAEError(f"{store.path} holds no dataset {unknown[0]!r} (it holds {', '.join(names)})")
    device = resolve_device(cfg.device)
    saes = load_saes(expand_sae_paths(cfg.saes), device)
    for s in saes:
        check_compatible(s, store)  # model, width and layers, one line each
    rows: list[dict[str, Any]] = []
    for d in chosen:
        rows += probe_dataset(store, names.index(d), saes, ks, cfg.seed, device, cfg.progress)
    result = {
        "store": str(store.path), "ks": ks, "seed": cfg.seed, "datasets": chosen,
        "saes": [{"name": s.name, "path": str(s.path), "arch": s.sae.config.arch, "layers": list(s.sae.config.layers),
                  "n_latents": s.sae.config.n_latents, "k": s.sae.config.k, "code": CODE_WORDS[code_kind(s.sae)],
                  "summary": summarize(rows, s, chosen, ks)} for s in saes],
        "rows": rows,
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "probe.json", result, indent=1)
    write_text(out / "probe.md", markdown(result))
    if cfg.progress:
        tqdm.write(f"wrote {out / 'probe.json'} and {out / 'probe.md'}", file=sys.stderr)
    return result, out


def summary_lines(result: dict[str, Any]) -> list[str]:
    """One line per SAE, for the terminal."""
    return [terminal_line(s["name"], s["summary"], result["ks"], len(result["datasets"])) for s in result["saes"]]
