"""`routesae synth`: write an activation store whose activations are made from a known sparse
dictionary, with the truth beside them, so any SAE fitted on it can be scored against the answer
(quality/synth_score.py).

Per stored layer l and token t:  x_l[t] = sum_f a_f[t] * gain[l, f] * dictionary[l, f] + bias[l] + noise,
with noise ~ N(0, noise^2 I). The store has the schema of a harvested one (written through
StoreWriter), so `fit`, `eval` (cache metrics) and `info` read it as any other; its model record
says model "synthetic", source "synthetic", and a revision that hashes the generator's settings,
so SAEs from another synthetic store are refused by eval's compatibility check.

The structure, after SynthSAEBench (SAELens) at small scale:
- directions: unit norm and zero mean across d_model (routesae's default per-token normalization
  removes each token's mean: a direction with a mean would be partly erased and no SAE could
  match it exactly); more features than dimensions;
- firing: a low-rank Gaussian copula (feature f fires where g_f < Phi^-1(p_f), g = W z + e, so
  features with aligned loadings W_f co-fire) with Zipf nominal frequencies p_f;
- hierarchy: trees (`branching` children per node, `depth` levels below the root); a child fires
  only where its parent fires, and at most one child of a parent fires (siblings exclusive);
- magnitudes: relu(mu_f + sigma_f * N(0,1)), mu_f from mu_max (most frequent) to mu_min (least),
  sigma_f folded-normal(sigma_mean, sigma_std);
- BOS: the first token of every context is flagged special and holds bias[l] alone (no feature).

Placement over several layers (`placement`), per unit (a hierarchy tree or a free feature):
- 'one-layer': every feature lives in exactly one layer (its home, gain 1; absent elsewhere).
  Each token also draws a source layer uniformly, and only features homed there may fire (with
  probability min(L p_f, 0.95), so p_f stays the overall frequency), so all of a token's features
  live in one layer and the other layers hold bias + noise: RouteSAE's premise.
- 'spanning': every feature spans 2..span_max consecutive layers with gains in [0.3, 1] (peak 1),
  its direction drifting from layer to layer (drift > 0); it fires regardless of the source layer:
  the crosscoder's premise.
- 'mixed': half the units as 'one-layer', half as 'spanning'.

Determinism: the dictionary and structure come from the seed alone; tokens are generated in blocks
of BLOCK_TOKENS from (seed, block index), so the store is the same whatever its layout.

Truth files (STORE/synth/, routesae-independent: safetensors + JSON; see TRUTH_TENSORS)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from routesae.errors import RouteSAEError

PLACEMENTS = ("one-layer", "spanning", "mixed")
FORMAT = "routesae-synth-1"
TRUTH_DIR = "synth"
"""Folder inside the store holding the truth (not a Zarr node: written after the store's
consolidated metadata, so Zarr readers do not list it)."""
TRUTH_SAFETENSORS = "truth.safetensors"
TRUTH_JSON = "truth.json"
BLOCK_TOKENS = 4096
"""Tokens generated from one random stream."""
BOS_ID, QUIET_ID = 0, 1
"""Placeholder token ids: BOS, and a token where no feature fires; feature f's tokens are
FIRST_FEATURE_ID + f % (vocab_size - FIRST_FEATURE_ID), f the token's most active feature."""
FIRST_FEATURE_ID = 2
MAX_LOCAL_FREQ = 0.95
"""Cap of a one-layer feature's firing probability at the tokens of its own layer."""
TRUTH_TENSORS = {
    "dictionary": "[n_layers, n_features, d_model] float32: unit direction of feature f at stored layer l (zero where absent)",
    "gain": "[n_layers, n_features] float32: the feature's strength at each layer (0 where absent, peak 1)",
    "bias": "[n_layers, d_model] float32: b_l, added at every token",
    "frequency_nominal": ("[n_features] float32: p_f, the nominal firing probability (children: unused; a one-layer "
                          "feature fires with min(n_layers * p_f, 0.95) at the tokens of its layer, never elsewhere)"),
    "frequency": "[n_features] float32: share of non-special tokens where a_f > 0",
    "parent": "[n_features] int64: the feature's parent in its hierarchy tree, -1 for none",
    "single_layer": "[n_features] bool: the feature lives in one layer (and fires only at tokens of that source layer)",
    "peak_layer": "[n_features] int64: index into `layers` of the feature's largest gain",
    "mu": "[n_features] float32: magnitude mean", "sigma": "[n_features] float32: magnitude spread",
    "codes_indptr": "[n_tokens + 1] int64: CSR row pointers of the true codes a_f[t] > 0 (token-major)",
    "codes_feature": "[nnz] int32: feature of each entry", "codes_value": "[nnz] float32: a_f[t]",
    "source_layer": "[n_tokens] int64: index into `layers` of the token's source layer (-1 for BOS)",
}


@dataclass
class SynthConfig:
    """The generator's settings (saved in the store's `synthetic` record and truth.json)."""

    d_model: int = 32
    """Width of the activations."""
    n_features: int = 128
    """True features (more than d_model)."""
    n_layers: int = 1
    """Stored layers."""
    placement: str = "one-layer"
    """'one-layer', 'spanning' or 'mixed' (see the module docstring)."""
    tokens: int = 20_480
    """Tokens in the store (whole contexts)."""
    context_len: int = 64
    """Tokens per context; the first is a BOS."""
    seed: int = 0
    """Seeds the dictionary, the structure and every token."""
    zipf_exponent: float = 0.5
    """Nominal frequency of the i-th feature proportional to (i+1)^-zipf_exponent, before scaling."""
    max_freq: float = 0.4
    """Nominal frequency of the most frequent feature."""
    min_freq: float = 0.01
    """Nominal frequency of the least frequent one."""
    corr_rank: int = 4
    """Rank of the Gaussian copula's shared factor (0: independent firing)."""
    corr_strength: float = 0.5
    """Share of each feature's latent Gaussian variance from the shared factor (0..1)."""
    n_roots: int | None = None
    """Hierarchy trees; default n_features // 32."""
    branching: int = 2
    """Children per node of a tree."""
    depth: int = 2
    """Levels below each root."""
    child_prob: float = 0.5
    """Probability that one child fires where its parent fires."""
    mu_max: float = 5.0
    """Magnitude mean of the most frequent feature."""
    mu_min: float = 4.0
    """Magnitude mean of the least frequent one."""
    sigma_mean: float = 0.5
    """Magnitude spread: sigma_f = |N(sigma_mean, sigma_std)|."""
    sigma_std: float = 0.5
    """See sigma_mean."""
    bias_norm: float = 1.0
    """Norm of each layer's bias b_l."""
    noise: float = 0.05
    """Standard deviation of the Gaussian noise added to every value of non-BOS tokens."""
    span_max: int | None = None
    """Most layers a spanning feature covers; default all."""
    drift: float = 0.3
    """How far a spanning feature's direction moves between its layers (0: the same direction)."""
    vocab_size: int = 256
    """Range of the placeholder token ids."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_layers(n_layers: int) -> tuple[int, list[int]]:
    """(the model layer count to record, the stored hidden-state indices) such that the RouteSAE
    paper's default routed layers L//4 .. 3L//4 are exactly the stored layers, and the
    single-layer default 3L//4 is the last of them: fit's defaults then read every stored layer."""
    n = 1
    while True:
        layers = list(range(n // 4, 3 * n // 4 + 1))
        if len(layers) == n_layers:
            return n, layers
        n += 1


class Structure(NamedTuple):
    """Everything about the features that does not depend on the token."""

    dictionary: np.ndarray
    gain: np.ndarray
    bias: np.ndarray
    p: np.ndarray
    parent: np.ndarray
    children: list[list[int]]
    """Children of each feature, in order, for the parents in top-down order (see `order`)."""
    order: list[int]
    """Parents with children, each after its own parent."""
    single_layer: np.ndarray
    home: np.ndarray
    """Index into layers of a single-layer feature's layer (-1 for spanning ones)."""
    peak: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    loadings: np.ndarray
    """[n_features, corr_rank] copula loadings W_f."""
    threshold: np.ndarray
    """Phi^-1(p_f)."""


def check_config(cfg: SynthConfig) -> None:
    """Refuse settings the generator cannot honour, in one line."""
    if cfg.placement not in PLACEMENTS:
        raise RouteSAEError(f"unknown placement {cfg.placement!r}; choose from {', '.join(PLACEMENTS)}")
    if cfg.d_model < 2 or cfg.n_features < 1 or cfg.n_layers < 1:
        raise RouteSAEError("--d-model must be at least 2, --features and --layers at least 1")
    if cfg.placement != "one-layer" and cfg.n_layers < 2:
        raise RouteSAEError(f"placement {cfg.placement!r} needs at least two layers (--layers)")
    if cfg.placement != "one-layer" and cfg.span_max is not None and cfg.span_max < 2:
        raise RouteSAEError(f"span_max must be at least 2 for placement {cfg.placement!r}")
    if cfg.context_len < 2:
        raise RouteSAEError("--context-len must be at least 2 (a BOS and a token)")
    if cfg.tokens < 2 * cfg.context_len or cfg.tokens % cfg.context_len:
        raise RouteSAEError(f"--tokens must be a multiple of the context length {cfg.context_len} and at least two contexts")
    if not 0 < cfg.min_freq <= cfg.max_freq < 1:
        raise RouteSAEError("frequencies must satisfy 0 < min_freq <= max_freq < 1")
    if not 0 <= cfg.corr_strength < 1 or cfg.corr_rank < 0:
        raise RouteSAEError("corr_strength must be in [0, 1) and corr_rank non-negative")
    if cfg.branching < 1 or cfg.depth < 0 or not 0 <= cfg.child_prob <= 1:
        raise RouteSAEError("branching must be at least 1, depth non-negative, child_prob in [0, 1]")
    if tree_size(cfg) * roots(cfg) > cfg.n_features:
        raise RouteSAEError(f"{roots(cfg)} hierarchy trees of {tree_size(cfg)} features do not fit in {cfg.n_features} features")
    if cfg.vocab_size <= FIRST_FEATURE_ID:
        raise RouteSAEError(f"vocab_size must exceed {FIRST_FEATURE_ID}")


def roots(cfg: SynthConfig) -> int:
    return cfg.n_features // 32 if cfg.n_roots is None else cfg.n_roots


def tree_size(cfg: SynthConfig) -> int:
    return sum(cfg.branching ** level for level in range(cfg.depth + 1))


def _unit_centered(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    v -= v.mean(1, keepdims=True)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build_structure(cfg: SynthConfig) -> Structure:
    """The dictionary, per-layer placement, frequencies, hierarchy and magnitudes, from the seed."""
    from scipy.special import ndtri

    check_config(cfg)
    rng = np.random.default_rng([cfg.seed, 0])
    F, d, L = cfg.n_features, cfg.d_model, cfg.n_layers
    raw = (np.arange(F) + 1.0) ** -cfg.zipf_exponent
    span = raw.max() - raw.min()
    p = cfg.max_freq - (raw.max() - raw) / span * (cfg.max_freq - cfg.min_freq) if span > 0 else np.full(F, cfg.max_freq)
    mu = cfg.mu_max - (cfg.mu_max - cfg.mu_min) * np.arange(F) / max(F - 1, 1)
    sigma = np.abs(rng.normal(cfg.sigma_mean, cfg.sigma_std, F))

    # hierarchy: trees on a random subset of features; every node of a tree is one unit of placement
    parent = np.full(F, -1, dtype=np.int64)
    unit = np.arange(F)  # the unit each feature is placed with: its tree's root, or itself
    perm = rng.permutation(F)
    children: dict[int, list[int]] = {}
    order: list[int] = []
    taken = 0
    for _ in range(roots(cfg)):
        root = int(perm[taken])
        taken += 1
        level = [root]
        for _ in range(cfg.depth):
            nxt = []
            for node in level:
                kids = [int(k) for k in perm[taken:taken + cfg.branching]]
                taken += cfg.branching
                parent[kids] = node
                unit[kids] = root
                children[node] = kids
                order.append(node)
                nxt.extend(kids)
            level = nxt

    # placement per unit
    units = np.unique(unit)
    single_unit = {int(u): cfg.placement == "one-layer" for u in units}
    if cfg.placement == "mixed":
        for i, u in enumerate(rng.permutation(units)):
            single_unit[int(u)] = i % 2 == 0
    base = _unit_centered(rng, F, d)
    dictionary = np.zeros((L, F, d))
    gain = np.zeros((L, F))
    span_max = min(L, cfg.span_max or L)
    unit_home = {int(u): int(rng.integers(0, L)) for u in units}
    unit_span: dict[int, tuple[int, int]] = {}
    for u in units:
        width = int(rng.integers(2, span_max + 1)) if span_max >= 2 else 1
        start = int(rng.integers(0, L - width + 1))
        unit_span[int(u)] = (start, start + width)
    single = np.array([single_unit[int(unit[f])] for f in range(F)])
    home = np.full(F, -1, dtype=np.int64)
    for f in range(F):
        u = int(unit[f])
        if single[f]:
            home[f] = unit_home[u]
            dictionary[home[f], f] = base[f]
            gain[home[f], f] = 1.0
            continue
        lo, hi = unit_span[u]
        g = rng.uniform(0.3, 1.0, hi - lo)
        gain[lo:hi, f] = g / g.max()
        direction = base[f]
        for layer in range(lo, hi):  # a random walk from the span's first layer: neighbours stay close
            if layer > lo:
                step = direction + cfg.drift * _unit_centered(rng, 1, d)[0]
                direction = step / np.linalg.norm(step)  # both terms have zero mean, so the sum does
            dictionary[layer, f] = direction
    b = rng.standard_normal((L, d))
    bias = b / np.linalg.norm(b, axis=1, keepdims=True) * cfg.bias_norm
    if cfg.corr_rank:
        u = rng.standard_normal((F, cfg.corr_rank))
        loadings = u / np.linalg.norm(u, axis=1, keepdims=True) * math.sqrt(cfg.corr_strength)
    else:
        loadings = np.zeros((F, 0))
    peak = gain.argmax(0).astype(np.int64)
    # A one-layer feature may fire only at the 1/L of tokens of its layer: there it fires with
    # probability L * p_f (at most MAX_LOCAL_FREQ), so p_f stays its overall frequency.
    fire_p = np.where(single, np.minimum(p * L, MAX_LOCAL_FREQ), p)
    return Structure(dictionary.astype(np.float32), gain.astype(np.float32), bias.astype(np.float32), p,
                     parent, [children[n] for n in order], order, single, home, peak, mu, sigma, loadings, ndtri(fire_p))


class Block(NamedTuple):
    """Tokens [start, stop) as generated."""

    acts: np.ndarray
    """[n_layers, n, d_model] float32."""
    codes: np.ndarray
    """[n, n_features] float32: the true codes a_f[t]."""
    source: np.ndarray
    """[n] int64: index of the token's source layer (-1 for BOS)."""
    bos: np.ndarray
    """[n] bool."""


def generate_block(cfg: SynthConfig, s: Structure, index: int) -> Block:
    """Tokens [index * BLOCK_TOKENS, ... + BLOCK_TOKENS) (cut at cfg.tokens)."""
    start = index * BLOCK_TOKENS
    n = min(BLOCK_TOKENS, cfg.tokens - start)
    rng = np.random.default_rng([cfg.seed, 1, index])
    F, L = cfg.n_features, cfg.n_layers
    z = rng.standard_normal((n, s.loadings.shape[1]))
    e = rng.standard_normal((n, F))
    own = np.sqrt(1.0 - (s.loadings ** 2).sum(1))
    fire = (z @ s.loadings.T + e * own) < s.threshold
    is_child = s.parent >= 0
    fire[:, is_child] = False
    for node, kids in zip(s.order, s.children):  # top-down: a parent's firing is final before its children's
        u = rng.random(n)
        pick = rng.integers(0, len(kids), n)
        on = fire[:, node] & (u < cfg.child_prob)
        for j, kid in enumerate(kids):
            fire[:, kid] = on & (pick == j)
    source = rng.integers(0, L, n)
    fire &= ~s.single_layer | (source[:, None] == s.home[None, :])
    magnitude = np.maximum(s.mu + s.sigma * rng.standard_normal((n, F)), 0.0)
    codes = np.where(fire, magnitude, 0.0)
    bos = (np.arange(start, start + n) % cfg.context_len) == 0
    codes[bos] = 0.0
    source[bos] = -1
    noise = rng.standard_normal((L, n, cfg.d_model)) * cfg.noise
    noise[:, bos] = 0.0
    effective = s.gain[:, :, None] * s.dictionary  # [L, F, d]
    acts = np.einsum("nf,lfd->lnd", codes, effective) + s.bias[:, None, :] + noise
    return Block(acts.astype(np.float32), codes.astype(np.float32), source.astype(np.int64), bos)


def token_ids(codes: np.ndarray, bos: np.ndarray, vocab_size: int) -> np.ndarray:
    """Placeholder ids: BOS_ID, QUIET_ID where nothing fires, else one per most active feature."""
    ids = FIRST_FEATURE_ID + codes.argmax(1) % (vocab_size - FIRST_FEATURE_ID)
    ids = np.where(codes.max(1) > 0, ids, QUIET_ID)
    return np.where(bos, BOS_ID, ids).astype(np.int32)


class SynthResult(NamedTuple):
    """What `make_synthetic_store` wrote."""

    path: Path
    layers: list[int]
    n_tokens: int
    true_l0: float
    """Mean true active features per non-special token."""
    shares: list[float]
    """Share of non-special tokens with each source layer (one-layer features' layer)."""


def revision(cfg: SynthConfig) -> str:
    """The model record's revision: a hash of the settings (another synthetic store, another 'model')."""
    return "synthetic-" + hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def make_synthetic_store(cfg: SynthConfig, out: str | Path, overwrite: bool = False,
                         progress: Callable[[int, int], None] | None = None) -> SynthResult:
    """Write the store (and its truth in STORE/synth/) at `out`, whole or not at all."""
    import torch

    from routesae import __version__
    from routesae.atomic_files import atomic_directory, write_json
    from routesae.store.zarr_store import StatsAccumulator, StoreWriter, plan_layout
    from routesae.train.checkpoint import write_safetensors

    check_config(cfg)
    out = Path(out)
    _clear_out(out, overwrite)
    s = build_structure(cfg)
    n_model, layers = model_layers(cfg.n_layers)
    layout = plan_layout(cfg.context_len, cfg.d_model, cfg.n_layers, 4, batch_contexts=1)
    provenance = {
        "model": {"id": "synthetic", "source": "synthetic", "revision": revision(cfg), "dtype": "float32",
                  "compute_dtype": "float32", "architecture": "synthetic", "n_layers": n_model,
                  "d_model": cfg.d_model, "max_positions": cfg.context_len, "tokenizer": None,
                  "vocab_size": cfg.vocab_size},
        "dataset": {"id": "synthetic", "split": "train", "text_field": None, "shuffle_buffer": 0},
        "context_len": cfg.context_len,
        "seed": cfg.seed,
        "batch_size": 1,
        "package_version": __version__,
        "synthetic": {"format": FORMAT, "truth": f"{TRUTH_DIR}/{TRUTH_SAFETENSORS}", "config": cfg.to_dict()},
    }
    indptr = [np.zeros(1, dtype=np.int64)]
    features: list[np.ndarray] = []
    values: list[np.ndarray] = []
    sources: list[np.ndarray] = []
    fired = np.zeros(cfg.n_features, dtype=np.int64)
    count = 0
    cached: tuple[int, Block] | None = None

    def tokens_of(a: int, b: int) -> Block:
        """Tokens [a, b) from the blocks that hold them (a block cut by a shard edge is kept once)."""
        nonlocal cached
        parts = []
        for index in range(a // BLOCK_TOKENS, (b - 1) // BLOCK_TOKENS + 1):
            if cached is None or cached[0] != index:
                cached = (index, generate_block(cfg, s, index))
            blk = cached[1]
            lo, hi = max(a, index * BLOCK_TOKENS) - index * BLOCK_TOKENS, min(b, (index + 1) * BLOCK_TOKENS) - index * BLOCK_TOKENS
            parts.append(Block(blk.acts[:, lo:hi], blk.codes[lo:hi], blk.source[lo:hi], blk.bos[lo:hi]))
        return Block(*(np.concatenate([getattr(p, name) for p in parts], axis=1 if name == "acts" else 0)
                       for name in Block._fields))

    with atomic_directory(out) as tmp:
        writer = StoreWriter.create(tmp, provenance, layers, cfg.d_model, "float32", cfg.tokens, layout)
        stats = StatsAccumulator(layers, cfg.d_model)
        for shard, a in enumerate(range(0, cfg.tokens, layout.shard_tokens)):
            b = min(a + layout.shard_tokens, cfg.tokens)
            blk = tokens_of(a, b)
            positions = (np.arange(a, b) % cfg.context_len).astype(np.int32)
            writer.write_shard(shard, np.ascontiguousarray(blk.acts), token_ids(blk.codes, blk.bos, cfg.vocab_size),
                               positions, blk.bos)
            stats.add(torch.from_numpy(blk.acts), torch.from_numpy(~blk.bos))
            rows, cols = np.nonzero(blk.codes)
            features.append(cols.astype(np.int32))
            values.append(blk.codes[rows, cols].astype(np.float32))
            indptr.append(indptr[-1][-1] + np.cumsum(np.bincount(rows, minlength=b - a)))
            sources.append(blk.source)
            fired += (blk.codes > 0).sum(0)
            count += int((~blk.bos).sum())
            if progress:
                progress(b, cfg.tokens)
        writer.finish(cfg.tokens, stats.state())
        codes_indptr = np.concatenate(indptr)
        source = np.concatenate(sources)
        nonspecial = source >= 0
        true_l0 = float(np.diff(codes_indptr)[nonspecial].mean())
        shares = [float((source[nonspecial] == i).mean()) for i in range(cfg.n_layers)]
        tensors = {
            "dictionary": s.dictionary, "gain": s.gain, "bias": s.bias,
            "frequency_nominal": s.p.astype(np.float32), "frequency": (fired / max(count, 1)).astype(np.float32),
            "parent": s.parent, "single_layer": s.single_layer, "peak_layer": s.peak,
            "mu": s.mu.astype(np.float32), "sigma": s.sigma.astype(np.float32),
            "codes_indptr": codes_indptr, "codes_feature": np.concatenate(features), "codes_value": np.concatenate(values),
            "source_layer": source,
        }
        truth_dir = tmp / TRUTH_DIR
        write_safetensors(truth_dir / TRUTH_SAFETENSORS, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
                          {"format": FORMAT})
        write_json(truth_dir / TRUTH_JSON, {
            "format": FORMAT,
            "formula": "x_l[t] = sum_f a_f[t] * gain[l, f] * dictionary[l, f] + bias[l] + N(0, noise^2 I) "
                       "(BOS tokens: bias[l] alone); a_f[t] are the CSR codes",
            "config": cfg.to_dict(),
            "layers": layers,
            "n_tokens": cfg.tokens,
            "true_l0": true_l0,
            "source_layer_shares": shares,
            "tensors": TRUTH_TENSORS,
        })
    return SynthResult(out, layers, cfg.tokens, true_l0, shares)


def _clear_out(out: Path, overwrite: bool) -> None:
    """Make way for the store: an absent or empty folder, or (with overwrite) a routesae store."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise RouteSAEError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    from routesae.store.zarr_store import remove_store

    try:
        meta = json.loads((out / "zarr.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if "routesae" not in (meta.get("attributes") or {}):
        raise RouteSAEError(f"{out} is not a routesae store; --overwrite replaces only stores")
    remove_store(out)
