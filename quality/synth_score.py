"""`routesae synth-score`: score SAEs fitted on a synthetic store (quality/synth_data.py) against
its true features.

Dictionary recovery compares an SAE's decoder rows with true feature directions, by |cos| (sign
and scale free: the SAE's normalization rescales, and true features are zero-mean, so the
per-token normalization keeps their directions):
- MCC: the best one-to-one matching (Hungarian, scipy's linear_sum_assignment on 1 - |cos|) of
  decoder rows with true features, and the mean |cos| of the min(n_latents, n_true) matched pairs
  (as SAELens's SynthSAEBench evals);
- recovered: the share of true features whose best |cos| over all decoder rows reaches the
  threshold (default 0.9).

Which decoder meets which truth:
- single-layer SAEs: the decoder vs the features present at the SAE's layer;
- crosscoders: each layer's decoder block vs the features present at that layer; the SAE's
  figures are the means over its layers (the per-layer ones are in the JSON);
- RouteSAE and MLSAE (one dictionary for all their layers): the decoder vs every feature present
  at any of their layers, each at the layer of its largest gain among them (on a 'one-layer'
  store: its home layer).

Reconstruction, over the non-special tokens scored (the SAEs' held-out tail, or the whole store):
- explained variance EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean_l||^2, in model space, the
  mean taken per layer (RouteSAE: the rows of the routed layers; MLSAE, crosscoder: all layers);
- shrinkage: mean ||x_hat|| / ||x|| over the same rows;
- L0: non-zero latents per code (RouteSAE: the routed code; MLSAE: per (token, layer) code),
  beside the true L0 (true features active per token, over all layers).
- routing accuracy (RouteSAE, on stores with one-layer features): the share of tokens with an
  active one-layer feature that the router sends to the layer those features live in (the
  token's source layer; tokens with none have no right answer and are left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from routesae.errors import RouteSAEError

DEFAULT_THRESHOLD = 0.9


@dataclass
class ScoreConfig:
    """The arguments of `routesae synth-score`."""

    saes: list[str]
    """SAE folders."""
    cache: str
    """A synthetic store (routesae synth)."""
    threshold: float = DEFAULT_THRESHOLD
    """|cos| at which a true feature counts as recovered."""
    all_tokens: bool = False
    """Score reconstruction on the whole store instead of the SAEs' held-out tail."""
    tokens: int | None = 65_536
    """At most this many tokens (whole contexts); None: all of the range."""
    batch_tokens: int = 8192
    """Tokens per batch."""
    device: str = "cpu"
    """'auto', 'cpu', 'cuda', ..."""


class Truth(NamedTuple):
    """A synthetic store's truth (STORE/synth/truth.safetensors), as numpy arrays."""

    layers: list[int]
    dictionary: np.ndarray
    """[n_layers, n_features, d_model]."""
    gain: np.ndarray
    """[n_layers, n_features]."""
    single_layer: np.ndarray
    codes_indptr: np.ndarray
    codes_feature: np.ndarray
    source_layer: np.ndarray
    config: dict[str, Any]


class Matching(NamedTuple):
    """One decoder against one set of true directions."""

    mcc: float
    recovered: float
    n_true: int


class SAEScore(NamedTuple):
    """One SAE's figures (see the module docstring)."""

    name: str
    arch: str
    layers: list[int]
    n_latents: int
    k: int
    mcc: float
    recovered: float
    per_layer: dict[str, dict[str, float]] | None
    """Crosscoders: MCC and recovered per layer."""
    explained_variance: float
    shrinkage: float
    l0: float
    true_l0: float
    routing_accuracy: float | None
    """RouteSAE on a store with one-layer features; else None."""

    def line(self, threshold: float) -> str:
        """The terminal line."""
        route = f", routing {self.routing_accuracy:.1%}" if self.routing_accuracy is not None else ""
        return (f"{self.name}: MCC {self.mcc:.3f}, recovered {self.recovered:.1%} (|cos| >= {threshold:g}), "
                f"EV {self.explained_variance:.3f}, shrinkage {self.shrinkage:.3f}, L0 {self.l0:.1f} "
                f"(true {self.true_l0:.1f}){route}")


class SynthReport(NamedTuple):
    """Every SAE's score on one synthetic store."""

    store: str
    placement: str
    token_range: tuple[int, int]
    threshold: float
    scores: list[SAEScore]

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store, "placement": self.placement, "token_range": list(self.token_range),
            "threshold": self.threshold, "saes": [s._asdict() for s in self.scores],
        }

    def markdown(self) -> str:
        lines = [f"Planted-feature recovery on {self.store} ({self.placement}, tokens {self.token_range[0]:,}.."
                 f"{self.token_range[1]:,})", "",
                 f"| SAE | arch | MCC | recovered (\\|cos\\| >= {self.threshold:g}) | EV | shrinkage | L0 | true L0 | routing |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in self.scores:
            route = f"{s.routing_accuracy:.1%}" if s.routing_accuracy is not None else "-"
            lines.append(f"| {s.name} | {s.arch} | {s.mcc:.3f} | {s.recovered:.1%} | {s.explained_variance:.3f} | "
                         f"{s.shrinkage:.3f} | {s.l0:.1f} | {s.true_l0:.1f} | {route} |")
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> list[Path]:
        """synth_score.json and synth_score.md in `folder`."""
        from routesae.atomic_files import write_json, write_text

        folder = Path(folder)
        return [write_json(folder / "synth_score.json", self.to_json()), write_text(folder / "synth_score.md", self.markdown())]


def load_truth(cache: Any) -> Truth:
    """The truth of a synthetic store; one-line errors for any other store or missing files."""
    from safetensors.numpy import load_file

    from routesae.quality.synth_data import FORMAT, TRUTH_DIR, TRUTH_SAFETENSORS

    record = cache.attrs.get("synthetic")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RouteSAEError(f"{cache.path} is not a synthetic store (no {FORMAT} record): it has no true features to "
                            "score against; make one with routesae synth")
    path = Path(str(cache.path)) / TRUTH_DIR / TRUTH_SAFETENSORS
    if not path.is_file():
        raise RouteSAEError(f"{path}: missing truth file of the synthetic store")
    try:
        t = load_file(str(path))
    except Exception as e:  # safetensors raises its own types for truncated files
        raise RouteSAEError(f"{path} is unreadable ({e})") from None
    truth = Truth(cache.layers, t["dictionary"], t["gain"], t["single_layer"].astype(bool), t["codes_indptr"],
                  t["codes_feature"], t["source_layer"], dict(record.get("config") or {}))
    if truth.dictionary.shape[:2] != truth.gain.shape or truth.dictionary.shape[0] != len(cache.layers) \
            or truth.dictionary.shape[2] != cache.d_model or truth.codes_indptr.shape[0] != cache.n_tokens + 1:
        raise RouteSAEError(f"{path} does not match its store (layers, width or token count)")
    return truth


def _unit(rows: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norm, out=np.zeros_like(rows), where=norm > 0)


def match(decoder: np.ndarray, truth: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> Matching:
    """decoder [n_latents, d] against true directions [n_true, d] (see the module docstring)."""
    from scipy.optimize import linear_sum_assignment

    if len(truth) == 0:
        return Matching(float("nan"), float("nan"), 0)
    cos = np.abs(_unit(decoder.astype(np.float64)) @ _unit(truth.astype(np.float64)).T)
    rows, cols = linear_sum_assignment(1.0 - cos)
    return Matching(float(cos[rows, cols].mean()), float((cos.max(0) >= threshold).mean()), len(truth))


def decoder_views(sae: Any, truth: Truth) -> list[tuple[int | None, np.ndarray, np.ndarray]]:
    """(layer or None, decoder rows [n_latents, d], true directions [n_true, d]) to match."""
    cfg = sae.config
    W = sae.coder.W_dec.detach().float().cpu().numpy()
    idx = [truth.layers.index(layer) for layer in cfg.layers]
    if not getattr(sae, "multi_layer", False):
        i = idx[0]
        return [(cfg.layers[0], W, truth.dictionary[i, truth.gain[i] > 0])]
    if W.shape[1] == len(idx) * cfg.d_model:  # a crosscoder: one block per layer
        blocks = W.reshape(W.shape[0], len(idx), cfg.d_model)
        return [(layer, blocks[:, j], truth.dictionary[i, truth.gain[i] > 0]) for j, (layer, i) in enumerate(zip(cfg.layers, idx))]
    gain = truth.gain[idx]  # one dictionary for every layer: each feature at its strongest of them
    present = gain.max(0) > 0
    peak = np.asarray(idx)[gain.argmax(0)]
    features = np.flatnonzero(present)
    return [(None, W, truth.dictionary[peak[features], features])]


class _Sums:
    """Running sums of the reconstruction figures, per layer slot."""

    def __init__(self, n_slots: int, d: int):
        self.err = 0.0
        self.sum = np.zeros((n_slots, d))
        self.sq = np.zeros(n_slots)
        self.rows = np.zeros(n_slots, dtype=np.int64)
        self.ratio = 0.0
        self.codes = 0
        self.active = 0

    def add(self, x: Any, x_hat: Any, slot: Any) -> None:
        """x, x_hat [n, d] float tensors (model space), slot [n] int tensor."""
        x64, xh64 = x.double().cpu().numpy(), x_hat.double().cpu().numpy()
        s = slot.cpu().numpy()
        self.err += float(((x64 - xh64) ** 2).sum())
        np.add.at(self.sum, s, x64)
        np.add.at(self.sq, s, (x64 ** 2).sum(1))
        self.rows += np.bincount(s, minlength=len(self.rows))
        norm = np.linalg.norm(x64, axis=1)
        self.ratio += float((np.linalg.norm(xh64, axis=1) / np.maximum(norm, 1e-12)).sum())

    def explained_variance(self) -> float:
        keep = self.rows > 0
        var = float((self.sq[keep] - (self.sum[keep] ** 2).sum(1) / self.rows[keep]).sum())
        return 1.0 - self.err / var if var > 0 else float("nan")


def score_sae(s: Any, cache: Any, truth: Truth, start: int, stop: int, threshold: float, batch_tokens: int) -> SAEScore:
    """One loaded SAE (sae_folders.LoadedSAE) on store tokens [start, stop)."""
    import torch

    from routesae.interpret.codes import sae_input

    sae, cfg = s.sae, s.sae.config
    views = decoder_views(sae, truth)
    matches = [match(W, rows, threshold) for _, W, rows in views]
    per_layer = ({str(layer): {"mcc": m.mcc, "recovered": m.recovered, "n_true": m.n_true} for (layer, _, _), m in zip(views, matches)}
                 if len(views) > 1 else None)
    is_route = hasattr(sae, "route")
    is_joint = getattr(sae, "multi_layer", False) and not is_route
    n_slots = len(cfg.layers)
    sums = _Sums(n_slots, cfg.d_model)
    routed = correct = 0
    true_nnz = true_rows = 0
    local = _tokens_with_local(truth)
    for a in range(start, stop, batch_tokens):
        b = min(a + batch_tokens, stop)
        keep = ~cache.special(a, b)
        if not bool(keep.any()):
            continue
        acts = {layer: cache.acts(layer, a, b)[keep] for layer in cfg.layers}
        x = sae_input(sae, acts).to(sae.device)
        lat = sae.encode_sparse(x)
        sums.codes += lat.values.reshape(-1, lat.values.shape[-1]).shape[0]
        sums.active += int((lat.values > 0).sum())
        if is_route:
            rec = sae.reconstruct(x)
            rows = torch.arange(x.shape[0], device=x.device)
            sums.add(x[rows, rec.layer_index].float(), rec.x_hat, rec.layer_index)
            tokens = np.arange(a, b)[keep.numpy()]
            want = truth.source_layer[tokens]
            has = local[tokens]
            chosen = np.asarray([truth.layers.index(cfg.layers[i]) for i in rec.layer_index.cpu().tolist()])
            routed += int(has.sum())
            correct += int((chosen[has] == want[has]).sum())
        elif is_joint:
            x_hat = sae.reconstruct(x)
            slot = torch.arange(n_slots, device=x.device).repeat(x.shape[0])
            sums.add(x.float().reshape(-1, cfg.d_model), x_hat.reshape(-1, cfg.d_model), slot)
        else:
            x_hat = sae.reconstruct(x)
            sums.add(x.float(), x_hat, torch.zeros(x.shape[0], dtype=torch.long))
        tokens = np.arange(a, b)[keep.numpy()]
        true_nnz += int((truth.codes_indptr[tokens + 1] - truth.codes_indptr[tokens]).sum())
        true_rows += len(tokens)
    if true_rows == 0:
        raise RouteSAEError(f"store tokens {start:,}..{stop:,} hold no non-special token to score")
    routing = None
    if is_route and truth.single_layer.any():
        routing = correct / routed if routed else float("nan")
    return SAEScore(
        name=s.name, arch=cfg.arch, layers=list(cfg.layers), n_latents=cfg.n_latents, k=cfg.k,
        mcc=float(np.mean([m.mcc for m in matches])), recovered=float(np.mean([m.recovered for m in matches])),
        per_layer=per_layer, explained_variance=sums.explained_variance(), shrinkage=sums.ratio / max(int(sums.rows.sum()), 1),
        l0=sums.active / max(sums.codes, 1), true_l0=true_nnz / true_rows, routing_accuracy=routing,
    )


def _tokens_with_local(truth: Truth) -> np.ndarray:
    """[n_tokens] bool: the token has an active one-layer feature (so a right layer to route to)."""
    counts = np.diff(truth.codes_indptr)
    token = np.repeat(np.arange(len(counts)), counts)
    out = np.zeros(len(counts), dtype=bool)
    out[token[truth.single_layer[truth.codes_feature]]] = True
    return out


def run_synth_score(cfg: ScoreConfig) -> SynthReport:
    """Score cfg.saes on the synthetic store cfg.cache."""
    from routesae.model.loading import resolve_device
    from routesae.sae_folders import check_compatible, held_out_range, load_saes
    from routesae.store.zarr_store import Cache

    if not 0 < cfg.threshold <= 1:
        raise RouteSAEError(f"--threshold must be in (0, 1], got {cfg.threshold:g}")
    if cfg.batch_tokens < 1:
        raise RouteSAEError("--batch-tokens must be at least 1")
    cache = Cache.open(cfg.cache, require_complete=True)
    truth = load_truth(cache)
    saes = load_saes(cfg.saes, resolve_device(cfg.device))
    for s in saes:
        check_compatible(s, cache)
    start, stop = held_out_range(cache, saes, cfg.all_tokens, cfg.tokens)
    scores = [score_sae(s, cache, truth, start, stop, cfg.threshold, cfg.batch_tokens) for s in saes]
    return SynthReport(str(cache.path), str(truth.config.get("placement")), (start, stop), cfg.threshold, scores)
