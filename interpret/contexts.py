"""`routesae contexts`: one streaming pass of one or more SAEs over stored activations, keeping per
latent its firing count, an activation histogram, its top activations, a uniform sample of them,
windows where it is zero and the RouteSAE paper's contexts; the text comes back from the store's
token ids, so the LLM never runs. The output (formats.md) is plain JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from routesae.atomic_files import atomic_open, write_json
from routesae.cpu_memory import ResidentCap
from routesae.errors import RouteSAEError
from routesae.sae_folders import weights_digest
from routesae.store.zarr_store import Cache
from routesae.interpret.codes import has_layer_per_activation, sae_input, token_codes
from routesae.interpret.tables import Batch, NegativeTable, PaperTable, SampleTable, TopTable, sorted_code
from routesae.interpret.windows import segments, sentence_bounds, sentence_end_tokens, window_bounds
from routesae.interpret.choices import CONTEXTS_DEFAULTS, PAPER_THRESHOLD, RULES

FORMAT = "routesae-contexts"
VERSION = 1
HIST_EDGES = [float(v) for v in np.logspace(-3, 3, 61)]
"""Bins of the activation histograms: 10 per decade from 0.001 to 1000 (the SAEs' normalized space)."""
PAPER_MAX_DISTINCT, PAPER_PER_TOKEN = 32, 2
"""The paper's limit on distinct activating tokens, and its contexts kept per token."""
OWN_FILES = ("contexts.json", "latents.jsonl", "tokens.json", "latents.jsonl.partial", "contexts.json.partial")


@dataclass
class ContextsConfig:
    """The arguments of `routesae contexts`."""

    saes: list[str]
    """SAE folders."""
    cache: str
    """The activation store."""
    out: str
    """Output folder (one SAE), or parent of one folder per SAE."""
    rule: str = "paper"
    """Interpretable-feature rule: 'paper' (at least 4 contexts) or 'paper-code' (at least 5)."""
    left: int = CONTEXTS_DEFAULTS["left"]
    """Tokens of a window before the activating token."""
    right: int = CONTEXTS_DEFAULTS["right"]
    """Tokens of a window after it."""
    top: int = CONTEXTS_DEFAULTS["top"]
    """Top activations kept per latent."""
    quantiles: int = CONTEXTS_DEFAULTS["quantiles"]
    """Equal-count activation quantiles to sample examples from."""
    per_quantile: int = CONTEXTS_DEFAULTS["per_quantile"]
    """Examples per quantile."""
    samples: int = CONTEXTS_DEFAULTS["samples"]
    """Further activating examples per latent, held out for scoring."""
    negatives: int = CONTEXTS_DEFAULTS["negatives"]
    """Windows per latent where it is zero throughout."""
    all_tokens: bool = False
    """Read the whole store, not the SAEs' held-out tail."""
    tokens: int | None = None
    """At most this many tokens (whole contexts)."""
    threshold: float = PAPER_THRESHOLD
    """Paper rule: activation above which a latent is active."""
    max_distinct: int = PAPER_MAX_DISTINCT
    """Paper rule: latents with more distinct activating tokens are dropped."""
    per_token: int = PAPER_PER_TOKEN
    """Paper rule: contexts kept per distinct (lower-cased) token."""
    min_contexts: int | None = None
    """Paper rule: contexts a latent needs to count as interpretable (default: the rule's)."""
    sentence_max: int = 64
    """Paper rule: a sentence longer than this is cut to half of it each side of the token."""
    batch_contexts: int = 8
    """Contexts per batch of the pass."""
    seed: int = 0
    """Seed of the samples and negatives."""
    model: str | None = None
    """Load the tokenizer from here instead of the store's model id."""
    device: str = "auto"
    """Where the SAEs encode: auto, cpu, cuda, cuda:N."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace finished contexts of other settings."""

    @property
    def window(self) -> int:
        return self.left + self.right + 1

    @property
    def pool(self) -> int:
        """Size of each latent's uniform sample: enough for the quantile examples and the held-out ones."""
        return 2 * (self.quantiles * self.per_quantile + self.samples)

    def settings(self) -> dict[str, Any]:
        keep = ("rule", "left", "right", "top", "quantiles", "per_quantile", "samples", "negatives", "threshold",
                "max_distinct", "per_token", "sentence_max", "seed", "batch_contexts")
        s = {k: getattr(self, k) for k in keep}
        s["min_contexts"] = self.min_contexts if self.min_contexts is not None else RULES[self.rule]
        s["histogram_edges"] = HIST_EDGES
        return s


class ContextsResult(NamedTuple):
    """What one SAE's pass found."""

    name: str
    out: Path
    n_latents: int
    interpretable: int
    """Latents the paper rule counts."""
    kept: int
    """Latents within the rule's distinct-token limit that were active at all."""
    active: int
    """Latents with any activation above the threshold."""
    dead: int
    """Latents that never fired."""
    max_activation: float
    """The largest activation of any latent."""
    d_model: int
    """Width the SAE reads (what the paper's threshold scales with)."""
    threshold: float
    """The activation threshold the count used."""
    min_contexts: int
    """Contexts a latent needed to count."""
    label: str
    """What the count is: "the paper's rule" only at its settings (rule_label)."""
    already_done: bool


class RuleLabel(NamedTuple):
    """How a count or verdict of the interpretable-feature rule is named. It is "the paper's rule" only
    at the paper's settings: a count at another threshold is not the paper's figure, so it says so."""

    paper: bool
    """The settings are the rule's own (threshold 15 and the rule's other numbers)."""
    threshold: float | None
    """The activation threshold used (None: not recorded)."""
    name: str
    """"the paper's rule", or e.g. "interpretable at threshold 3 (the paper's rule uses 15)"."""
    scope: str
    """What a verdict is by: "the paper's rule" or "at threshold 3"."""
    note: str
    """What differs from the rule: "the paper's rule uses 15" ("" at its settings)."""
    criteria: str
    """The rule spelled out: "activation above 3, at most 32 distinct tokens, ..."."""
    column: str
    """A table column's heading: "Paper's rule (> 15)" or "At threshold 3"."""


def rule_label(settings: dict[str, Any]) -> RuleLabel:
    """The name of the rule that contexts of these settings (contexts.json's `settings`) counted by."""
    rule = settings.get("rule") if settings.get("rule") in RULES else "paper"
    whose = "the paper's rule" if rule == "paper" else "the paper code's rule"
    t = settings.get("threshold")
    threshold = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None
    at = "an unrecorded threshold" if threshold is None else f"threshold {threshold:g}"
    above = "an unrecorded threshold" if threshold is None else f"{threshold:g}"
    min_contexts = settings.get("min_contexts", RULES[rule])
    max_distinct = settings.get("max_distinct", PAPER_MAX_DISTINCT)
    per_token = settings.get("per_token", PAPER_PER_TOKEN)
    criteria = (f"activation above {above}, at most {max_distinct} distinct tokens, {per_token} contexts per token, "
                f"at least {min_contexts} contexts")
    ours, its = [], []  # what these settings use where the rule's differ, and the rule's
    if threshold != PAPER_THRESHOLD:
        its.append(f"{PAPER_THRESHOLD:g}")
    for value, standard, text in ((min_contexts, RULES[rule], "at least {} contexts"),
                                  (max_distinct, PAPER_MAX_DISTINCT, "at most {} distinct tokens"),
                                  (per_token, PAPER_PER_TOKEN, "{} contexts per token")):
        if value != standard:
            ours.append(text.format(value))
            its.append(text.format(standard))
    if not its:
        column = f"{whose[4].upper()}{whose[5:]} (> {PAPER_THRESHOLD:g})"
        return RuleLabel(True, threshold, whose, whose, "", criteria, column)
    note = f"{whose} uses {', '.join(its)}"
    name = f"interpretable at {', '.join([at, *ours])} ({note})"
    return RuleLabel(False, threshold, name, f"at {at}", note, criteria, f"At {at}")


def check_config(cfg: ContextsConfig) -> None:
    if cfg.rule not in RULES:
        raise RouteSAEError(f"--rule {cfg.rule!r}: use {' or '.join(RULES)}")
    for name in ("top", "quantiles", "per_quantile", "batch_contexts", "per_token", "max_distinct", "sentence_max"):
        if getattr(cfg, name) < 1:
            raise RouteSAEError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("left", "right", "samples", "negatives"):
        if getattr(cfg, name) < 0:
            raise RouteSAEError(f"--{name} must not be negative")
    if not cfg.threshold >= 0:
        raise RouteSAEError("--threshold must be a non-negative number")


class _Vocab(NamedTuple):
    texts: list[str]
    """Each token id decoded alone."""
    canon: torch.Tensor
    """[vocab] id of each token's lower-cased text (the paper's grouping)."""
    ends: np.ndarray
    """[vocab] bool: the token ends a sentence."""


def load_vocab(cache: Cache, spec: str | None) -> _Vocab:
    from routesae.model.loading import load_tokenizer

    if spec is None and cache.model.get("source") == "synthetic":
        # a synthetic store (routesae synth) has no text: its token ids are placeholders, shown as such
        texts = [f"<t{i}>" for i in range(int(cache.model.get("vocab_size") or 0))]
        return _Vocab(texts, torch.arange(len(texts)), np.zeros(len(texts), dtype=bool))
    spec = spec or cache.model.get("id")
    if not spec:
        raise RouteSAEError(f"{cache.path} records no model id to load its tokenizer from; pass --model")
    tok = load_tokenizer(spec)
    size = int(cache.model.get("vocab_size") or len(tok))
    size = max(size, len(tok))
    texts = tok.batch_decode([[i] for i in range(size)], clean_up_tokenization_spaces=False)
    ids: dict[str, int] = {}
    canon = torch.tensor([ids.setdefault(t.lower(), len(ids)) for t in texts], dtype=torch.long)
    return _Vocab(texts, canon, sentence_end_tokens(texts))


class _SAEPass:
    """One SAE's tables over the pass."""

    def __init__(self, loaded: Any, cfg: ContextsConfig, vocab: _Vocab, device: torch.device):
        self.loaded = loaded
        self.sae = loaded.sae
        self.cfg = cfg
        n = self.sae.config.n_latents
        self.n_latents = n
        self.has_layers = has_layer_per_activation(self.sae)
        self.count = torch.zeros(n, dtype=torch.long)
        self.max = torch.zeros(n)
        self.hist = torch.zeros(n * (len(HIST_EDGES) - 1), dtype=torch.long)
        self.n_layers = len(self.sae.config.layers)
        self.layer_counts = torch.zeros(n * self.n_layers, dtype=torch.long)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.top = TopTable(n, cfg.top, cfg.window)
        self.sample = SampleTable(n, cfg.pool, cfg.window, gen)
        self.negatives = NegativeTable(n, cfg.negatives, max(16, cfg.negatives), gen)
        self.paper = PaperTable(n, vocab.canon, cfg.threshold, cfg.per_token, cfg.max_distinct)
        self.edges = torch.tensor(HIST_EDGES[1:-1])
        self.device = device

    def add(self, acts: dict[int, torch.Tensor], token_ids: torch.Tensor, special: torch.Tensor, offset: int,
            first: torch.Tensor, end: torch.Tensor) -> None:
        keep = (~special).nonzero().squeeze(1)
        if keep.numel() == 0:
            return
        x = sae_input(self.sae, {layer: a[keep] for layer, a in acts.items()})
        codes = token_codes(self.sae, x.to(self.device))
        rows = keep[codes.rows.cpu()]
        latents, values = codes.latents.cpu(), codes.values.cpu()
        layers = codes.layers.cpu() if codes.layers is not None else torch.full_like(latents, -1)
        n = self.n_latents
        self.count += torch.bincount(latents, minlength=n)
        self.max.scatter_reduce_(0, latents, values, "amax")
        self.hist += torch.bincount(latents * (len(HIST_EDGES) - 1) + torch.bucketize(values, self.edges),
                                    minlength=self.hist.numel())
        if self.has_layers:
            self.layer_counts += torch.bincount(latents * self.n_layers + layers, minlength=self.layer_counts.numel())
        win_start, win_stop = window_bounds(torch.arange(special.numel()), first, end, self.cfg.left, self.cfg.right)
        batch = Batch(offset, rows, latents, values, layers, win_start, win_stop,
                      *sorted_code(rows, latents, values, special.numel()))
        self.top.add(batch)
        self.sample.add(batch)
        if self.cfg.negatives:
            self.negatives.add(batch, keep)
        self.paper.add(batch, token_ids)


def _read_tokens(cache: Cache, spans: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Store spans [a, b), each inside one context -> their (token ids, special), read a block of
    contexts at a time in store order."""
    block = 64 * cache.context_len
    out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    by_block: dict[int, list[tuple[int, int]]] = {}
    for span in set(spans):
        by_block.setdefault(span[0] // block, []).append(span)
    for b in sorted(by_block):
        a0, a1 = b * block, min((b + 1) * block, cache.n_tokens)
        ids, special = cache.token_ids(a0, a1).numpy(), cache.special(a0, a1).numpy()
        for a, z in by_block[b]:
            out[(a, z)] = ids[a - a0:z - a0], special[a - a0:z - a0]
    return out


def _example(token: int | None, value: float | None, layer: int | None, start: int, stop: int,
             acts: np.ndarray | None) -> dict[str, Any]:
    ex: dict[str, Any] = {"token_index": token, "activation": value}
    if layer is not None:
        ex["layer"] = layer
    ex.update(start=start, mark=None if token is None else token - start)
    if acts is not None:
        ex["acts"] = [round(float(v), 4) for v in acts[: stop - start]]
    ex["_span"] = (start, stop)
    return ex


def _overlaps(span: tuple[int, int], taken: list[tuple[int, int]]) -> bool:
    return any(span[0] < b and a < span[1] for a, b in taken)


class _Writer:
    """The latents of one SAE, assembled from its tables and written to latents.jsonl."""

    def __init__(self, p: _SAEPass, cache: Cache, vocab: _Vocab, n_tokens: int):
        self.p, self.cache, self.vocab, self.n_tokens = p, cache, vocab, n_tokens
        self.layer_ids = list(p.sae.config.layers) if p.has_layers else None

    def _layer(self, index: int) -> int | None:
        return self.layer_ids[index] if self.layer_ids is not None and index >= 0 else None

    def _slots(self, table: dict[str, np.ndarray], latent: int, cols: list[int]) -> list[dict[str, Any]]:
        return [_example(int(table["token"][latent, c]), float(table["value"][latent, c]),
                         self._layer(int(table["layer"][latent, c])), int(table["start"][latent, c]),
                         int(table["stop"][latent, c]), table["acts"][latent, c]) for c in cols]

    def records(self) -> list[dict[str, Any]]:
        p, cfg = self.p, self.p.cfg
        bins = len(HIST_EDGES) - 1
        hist = p.hist.view(p.n_latents, bins)
        layer_counts = p.layer_counts.view(p.n_latents, p.n_layers)
        paper = _paper_contexts(p.paper)
        names = ("score", "value", "token", "start", "stop", "layer")
        order = p.top.ordered()  # slots are unordered during the pass
        top_t = {n: getattr(p.top, n).gather(1, order).numpy() for n in names}
        top_t["acts"] = p.top.acts.gather(1, order[:, :, None].expand_as(p.top.acts)).float().numpy()
        pool_t = {n: getattr(p.sample, n).numpy() for n in names} | {"acts": p.sample.acts.float().numpy()}
        neg_key, neg_start, neg_stop = p.negatives.key.numpy(), p.negatives.start.numpy(), p.negatives.stop.numpy()
        out = []
        min_contexts = cfg.settings()["min_contexts"]
        for latent in range(p.n_latents):
            rng = np.random.default_rng([cfg.seed, latent])
            top = self._slots(top_t, latent, np.nonzero(top_t["score"][latent] > -np.inf)[0].tolist())
            pool_cols = np.nonzero(pool_t["score"][latent] < np.inf)[0]
            pool_cols = pool_cols[np.argsort(pool_t["value"][latent, pool_cols], kind="stable")].tolist()
            # no window of one example overlaps another's: held-out ones stay unseen by an explainer
            taken = [ex["_span"] for ex in top]
            used: set[int] = set()

            def draw(cols: list[int], n: int) -> list[dict[str, Any]]:
                picked = []
                for c in rng.permutation(np.array(cols, dtype=np.int64)).tolist():
                    if len(picked) == n:
                        break
                    ex = self._slots(pool_t, latent, [c])[0]
                    if c not in used and not _overlaps(ex["_span"], taken):
                        picked.append(ex)
                        used.add(c)
                        taken.append(ex["_span"])
                return picked

            groups = np.array_split(np.array(pool_cols, dtype=np.int64), cfg.quantiles) if pool_cols else []
            quantiles = [draw(g.tolist(), cfg.per_quantile) for g in groups]
            samples = draw(pool_cols, cfg.samples)
            # zero windows that share no token with an example either (the explainer never saw their text)
            negatives = [_example(None, None, None, int(neg_start[latent, c]), int(neg_stop[latent, c]), None)
                         for c in np.nonzero(neg_key[latent] < np.inf)[0]
                         if not _overlaps((int(neg_start[latent, c]), int(neg_stop[latent, c])), taken)]
            dropped = bool(p.paper.dropped[latent])
            mine = paper.get(latent, [])
            paper_ex = None if dropped else [self._paper_example(v, t, layer) for v, t, layer in mine]
            count = int(p.count[latent])
            out.append({
                "latent": latent, "count": count, "frequency": count / self.n_tokens if self.n_tokens else 0.0,
                "max": float(p.max[latent]), "histogram": hist[latent].tolist(),
                "layers": layer_counts[latent].tolist() if p.has_layers else None,
                "top": top, "quantiles": quantiles, "samples": samples, "negatives": negatives,
                "paper": paper_ex, "paper_distinct": int(p.paper.distinct[latent]),
                "interpretable": (not dropped) and len(mine) >= min_contexts,
            })
        self._fill_tokens(out)
        return out

    def _paper_example(self, value: float, token: int, layer: int) -> dict[str, Any]:
        ctx = self.cache.context_len
        c0 = token // ctx * ctx
        half = self.p.cfg.sentence_max // 2
        a, b = max(c0, token - 2 * half - 1), min(c0 + ctx, token + 2 * half + 2)
        ex = _example(token, value, self._layer(layer), a, b, None)
        ex["_sentence"] = True
        return ex

    def _fill_tokens(self, records: list[dict[str, Any]]) -> None:
        examples = [ex for r in records for key in ("top", "samples", "negatives") for ex in r[key]]
        examples += [ex for r in records for q in r["quantiles"] for ex in q]
        examples += [ex for r in records if r["paper"] for ex in r["paper"]]
        tokens = _read_tokens(self.cache, [ex["_span"] for ex in examples])
        half = self.p.cfg.sentence_max // 2
        for ex in examples:
            ids, special = tokens[ex.pop("_span")]
            if ex.pop("_sentence", False):
                s, e = sentence_bounds(ids, special, ex["mark"], self.vocab.ends, half)
                ex["start"] += s
                ex["mark"] -= s
                ids = ids[s:e]
            ex["token_ids"] = ids.tolist()


def _paper_contexts(table: PaperTable) -> dict[int, list[tuple[float, int, int]]]:
    """Every kept latent's (activation, token, layer) contexts, largest first."""
    latents = table.key // table.n_canon
    order = torch.sort(table.value, descending=True, stable=True).indices
    order = order[torch.sort(latents[order], stable=True).indices]
    out: dict[int, list[tuple[float, int, int]]] = {}
    for lat, v, t, layer in zip(latents[order].tolist(), table.value[order].tolist(), table.token[order].tolist(),
                                table.layer[order].tolist()):
        out.setdefault(lat, []).append((v, t, layer))
    return out


def _manifest(cfg: ContextsConfig, loaded: Any, cache: Cache, start: int, stop: int, n_tokens: int,
              p: _SAEPass | None, counts: dict[str, int] | None) -> dict[str, Any]:
    c = loaded.sae.config
    m: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "complete": counts is not None,
        "sae": {"name": loaded.name, "path": str(Path(loaded.path).resolve()), "arch": c.arch, "layers": list(c.layers),
                "n_latents": c.n_latents, "k": c.k, "weights_sha256": weights_digest(Path(loaded.path))},
        "store": {"path": str(cache.path.resolve()), "fingerprint": cache.fingerprint, "context_len": cache.context_len},
        "tokens": [start, stop], "n_tokens": n_tokens, "settings": cfg.settings(),
        "layers": list(c.layers) if has_layer_per_activation(loaded.sae) else None,
    }
    if counts is not None:
        m["paper_rule"] = counts
    return m


def _same_request(old: dict[str, Any], new: dict[str, Any]) -> bool:
    keys = ("format", "version", "tokens", "settings")
    return (all(old.get(k) == new.get(k) for k in keys) and old.get("sae", {}).get("weights_sha256") ==
            new["sae"]["weights_sha256"] and old.get("store", {}).get("fingerprint") == new["store"]["fingerprint"])


def _prepare(out: Path, want: dict[str, Any], overwrite: bool) -> bool:
    """-> True when `out` already holds these finished contexts. A folder of an unfinished pass is
    cleared; one of another finished pass is replaced only with overwrite."""
    manifest = out / "contexts.json"
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("complete") and _same_request(old, want):
            return True
        if not overwrite:
            raise RouteSAEError(f"{out} holds contexts of other settings, another SAE or store; pass --overwrite to replace them")
    if out.exists():
        if not out.is_dir():
            raise RouteSAEError(f"{out} exists and is not a folder")
        foreign = [p.name for p in out.iterdir() if p.name not in OWN_FILES]
        if foreign:
            raise RouteSAEError(f"{out} holds other files ({foreign[0]}, ...): not a contexts folder; choose another --out")
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return False


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj, indent=None)


def run_contexts(cfg: ContextsConfig) -> list[ContextsResult]:
    """One pass over the store for every SAE of cfg.saes; writes each one's contexts folder."""
    from routesae.sae_folders import check_compatible, held_out_range, load_saes
    from routesae.model.loading import resolve_device
    from routesae.store.verify import raise_if_damaged

    check_config(cfg)
    cache = Cache.open(cfg.cache, require_complete=True)
    if not cache.has_token_ids:
        raise RouteSAEError(f"{cache.path} has no token ids: contexts are rebuilt from them")
    raise_if_damaged(cache)
    device = resolve_device(cfg.device)
    saes = load_saes(cfg.saes, device)
    for s in saes:
        check_compatible(s, cache)
    start, stop = held_out_range(cache, saes, cfg.all_tokens, cfg.tokens)
    special_all = cache.special(start, stop)
    n_tokens = int((~special_all).sum())
    del special_all
    root = Path(cfg.out)
    outs = {s.name: root if len(saes) == 1 else root / s.name.replace("/", "__") for s in saes}
    label = rule_label(cfg.settings())
    todo, results = [], []
    for s in saes:
        want = _manifest(cfg, s, cache, start, stop, n_tokens, None, None)
        if _prepare(outs[s.name], want, cfg.overwrite):
            old = json.loads((outs[s.name] / "contexts.json").read_text())["paper_rule"]
            results.append(ContextsResult(s.name, outs[s.name], s.sae.config.n_latents, old["interpretable"], old["kept"],
                                          old["active"], old["dead"], old["max_activation"], s.sae.config.d_model,
                                          cfg.threshold, want["settings"]["min_contexts"], label.name, True))
        else:
            todo.append(s)
    if todo:
        vocab = load_vocab(cache, cfg.model)
        passes = [_SAEPass(s, cfg, vocab, device) for s in todo]
        _stream(cache, passes, start, stop, cfg)
        for p in passes:
            results.append(_finish(p, cache, vocab, outs[p.loaded.name], cfg, start, stop, n_tokens))
    order = {s.name: i for i, s in enumerate(saes)}
    return sorted(results, key=lambda r: order[r.name])


def _stream(cache: Cache, passes: list[_SAEPass], start: int, stop: int, cfg: ContextsConfig) -> None:
    layers = sorted({layer for p in passes for layer in p.sae.config.layers})
    step = cfg.batch_contexts * cache.context_len
    bar = tqdm(total=stop - start, unit="tok", unit_scale=True, desc="contexts", disable=not cfg.progress,
               dynamic_ncols=True)
    cap = ResidentCap()  # memory bounded whatever the number of batches
    for a in range(start, stop, step):
        b = min(a + step, stop)
        token_ids, special = cache.token_ids(a, b).long(), cache.special(a, b)
        acts = {layer: cache.acts(layer, a, b) for layer in layers}
        first, end = segments(special, cache.context_len)
        for p in passes:
            p.add(acts, token_ids, special, a, first, end)
        bar.update(b - a)
        cap.check()
    bar.close()


def _finish(p: _SAEPass, cache: Cache, vocab: _Vocab, out: Path, cfg: ContextsConfig, start: int, stop: int,
            n_tokens: int) -> ContextsResult:
    records = _Writer(p, cache, vocab, n_tokens).records()
    interpretable = sum(r["interpretable"] for r in records)
    active = int(p.paper.active.sum())
    settings = cfg.settings()
    # the count says what it counted by: a reader of contexts.json alone sees the threshold with it
    counts = {"interpretable": interpretable, "kept": int((p.paper.active & ~p.paper.dropped).sum()), "active": active,
              "dead": int((p.count == 0).sum()), "max_activation": float(p.max.max()),
              "threshold": cfg.threshold, "min_contexts": settings["min_contexts"], "label": rule_label(settings).name}
    _write_json(out / "tokens.json", vocab.texts)
    with atomic_open(out / "latents.jsonl") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    _write_json(out / "contexts.json", _manifest(cfg, p.loaded, cache, start, stop, n_tokens, p, counts))
    return ContextsResult(p.loaded.name, out, p.n_latents, interpretable, counts["kept"], active, counts["dead"],
                          counts["max_activation"], p.sae.config.d_model, cfg.threshold, settings["min_contexts"],
                          counts["label"], False)
