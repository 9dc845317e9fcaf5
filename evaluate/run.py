"""`routesae eval`: load SAEs, check them against the store, pick the tokens, run the cache metrics
and (with splice) the LLM metrics, and assemble the report."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from routesae.cpu_memory import ResidentCap, keep_freed_memory
from routesae.errors import RouteSAEError
from routesae.evaluate.cache_eval import CacheRun, evaluate_cache_per_context
from routesae.evaluate.choices import BASELINES
from routesae.evaluate.per_context import SPLICE_METRICS, PerContext
from routesae.evaluate.report import Report, Row, layer_mean_row
from routesae.evaluate.splice import PREFIXES, SpliceEvaluator
from routesae.evaluate.targets import ROUTING_NOTES, JointCodes, LayerOfJointTarget, Target
from routesae.model.loading import load_store_model, resolve_device
from routesae.sae_folders import LoadedSAE, check_compatible, held_out_range, load_saes
from routesae.store.zarr_store import Cache
from routesae.store.verify import raise_if_damaged



@dataclass
class EvalConfig:
    """The arguments of `routesae eval`."""

    saes: list[str]
    """SAE folders (as `routesae fit` writes them: config.json + sae.safetensors)."""
    cache: str
    """The activation store to evaluate on."""
    splice: bool = False
    """Also reload the LLM and measure KL, delta-CE and loss recovered with the SAEs spliced in."""
    all_tokens: bool = False
    """Evaluate on the whole store (one harvested for evaluation) instead of the SAEs' held-out tail."""
    tokens: int | None = None
    """At most this many tokens (rounded down to whole contexts)."""
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    """Random-routing baselines evaluated with each RouteSAE's dictionary: 'uniform', 'random-layer'."""
    batch_size: int | None = None
    """Contexts per LLM forward (splice); None: the harvest's (as the store records it, else 8), so
    that clean runs can start from the stored activations."""
    batch_tokens: int = 8192
    """Tokens per batch of the cache metrics."""
    model: str | None = None
    """Load the LLM from here instead of the store's model id (its revision must still match)."""
    device: str = "auto"
    """'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ..."""
    seed: int = 0
    """Seed of the random-layer baseline."""
    prefix: str = "auto"
    """'auto': once a batch shows the store's activations equal the live forward's, start the clean
    run at the first spliced layer from the store; 'live': always run the whole forward."""
    progress: bool = True
    """Show progress bars."""


def build_targets(saes: list[LoadedSAE], baselines: list[str], seed: int) -> list[tuple[LoadedSAE, Target]]:
    out = []
    for s in saes:
        if hasattr(s.sae, "at_layer"):  # a multi-layer dictionary (MLSAE): each layer on its own
            out.extend((s, Target(f"{s.name} @{layer}", s.sae.at_layer(layer), "router", seed))
                       for layer in s.sae.config.layers)
            continue
        if s.sae.multi_layer and s.sae.config.arch != "routesae":  # one code of all layers (crosscoder)
            codes = JointCodes()
            out.extend((s, LayerOfJointTarget(f"{s.name} @{layer}", s.sae, layer, codes)) for layer in s.sae.config.layers)
            continue
        out.append((s, Target(s.name, s.sae, "router", seed)))
        if s.sae.config.arch == "routesae":
            for b in baselines:
                out.append((s, Target(f"{s.name} [{b}]", s.sae, b, seed)))
    return out


class SpliceRun(NamedTuple):
    """The splice metrics of the targets, and how the clean runs were computed."""

    results: list
    """One SpliceResult per target."""
    batches: dict[str, int]
    """Batches whose clean prefix was computed live / taken from the store."""
    store_matches: bool | None
    """Whether the store's activations equalled the live forward's (None: not compared)."""
    store_diff: float
    """Largest |stored - live| seen where they differed."""
    store_check: str | None
    """What showed the store equal: 'probe' (one context run live), 'batch' (a whole one), None."""
    zero_contexts: dict[str, int]
    """Contexts whose zero-ablation ran / was an identical context's (see SpliceEvaluator)."""
    contexts: np.ndarray
    """int64 [n_contexts]: the store contexts measured, in order."""
    per_context: list[dict[str, np.ndarray]]
    """Per target: per_context.SPLICE_METRICS name -> float64 [n_contexts] (see evaluate.per_context)."""


def splice_metrics(
    model: torch.nn.Module, cache: Cache, targets: list[Target], start: int, stop: int,
    batch_size: int, prefix: str = "auto", progress: bool = True, share_zero_runs: bool = True,
) -> SpliceRun:
    """Run the splice engine over the contexts of store tokens [start, stop)."""
    ctx, d = cache.context_len, cache.d_model
    ev = SpliceEvaluator(model, [t.splicer() for t in targets], prefix=prefix, share_zero_runs=share_zero_runs)
    bar = tqdm(total=stop - start, unit="tok", unit_scale=True, desc="eval (splice)", disable=not progress,
               dynamic_ncols=True)
    # Batches line up with multiples of batch_size contexts from the store's start, as a harvest
    # with the same batch size ran them: then, even where kernels round differently with the batch's
    # size, a whole batch run live equals the store and clean runs can start from it (see
    # SpliceEvaluator; on a CPU one context run live usually shows it already).
    step = batch_size * ctx
    bounds = [start, *range((start // step + 1) * step, stop, step), stop]
    cap = ResidentCap()  # memory bounded whatever the number of batches
    for a, b in zip(bounds[:-1], bounds[1:]):
        ids = cache.token_ids(a, b).view(-1, ctx)
        keep = ~cache.special(a, b).view(-1, ctx)

        def stored(layers: list[int], a: int = a, b: int = b) -> dict[int, torch.Tensor]:
            return {layer: cache.acts_stored(layer, a, b).view(-1, ctx, d) for layer in layers}

        def moved(done: float, doing: str, a: int = a, b: int = b) -> None:
            # within the batch: the bar stands at the share of its work done (a batch of a large
            # model's contexts, each run once per SAE, takes minutes)
            bar.set_postfix_str(doing, refresh=False)
            bar.update(a - start + int(done * (b - a)) - bar.n)

        ev.add_batch(ids, keep, torch.arange(a, b).view(-1, ctx), stored, moved)
        bar.update(b - start - bar.n)
        cap.check()
    bar.close()
    return SpliceRun(ev.results(), dict(ev.batches), ev.store_matches, ev.store_diff, ev.store_check,
                     dict(ev.zero_contexts), np.asarray(ev.contexts, dtype=np.int64), ev.per_context())


NOTES = [
    "Special tokens (BOS, EOS, pad) are left out of every metric and keep their original activations in every splice.",
    "NormMSE is the training loss, in the SAE's own input space (RouteSAE: p * x_norm of the routed layer), so it "
    "does not compare across architectures; FVU = sum_d Var(x_d - x_hat_d) / sum_d Var(x_d) in model space, of the "
    "activations a splice replaces.",
    "L0 = firing latents per token; dead = fraction of latents that never fired on the evaluated tokens.",
]
SPLICE_NOTES = [
    "KL/token: mean KL(clean || spliced) in nats over non-special positions. KL/context (paper): KL summed over the "
    "non-special positions of a context of {ctx} tokens, averaged over contexts: the kind of figure the RouteSAE paper "
    "reports (its contexts have 512 tokens).",
    "delta-CE = CE(spliced) - CE(clean); loss rec. = (CE(zero) - CE(spliced)) / (CE(zero) - CE(clean)), zero-ablating "
    "the same positions at the same layers; CE over non-special positions that have a next token in the context.",
    "Single-layer SAE: its layer's output is replaced at every non-special position by the de-normalized "
    "reconstruction. RouteSAE (hard): each token is replaced once, at the layer the router picked from the clean "
    "activations, by the reconstruction of p * x_norm divided back by p, de-normalized; later layers see the "
    "modified stream.",
]


def _prefix_note(run: SpliceRun) -> str:
    live, store = run.batches["live"], run.batches["store"]
    if store:
        how = ("one context run live up to the deepest spliced layer" if run.store_check == "probe"
               else "the first batch, run live")
        return (f"Clean runs: {store} batch(es) started from the store's activations (the clean run at the deepest "
                f"stored layer, each splice at its first spliced layer), {live} computed in full; {how} showed the "
                "store equal, bit for bit, to this machine's forward.")
    if run.store_matches is False:
        return (f"Clean runs: all {live} batch(es) computed in full; the store's activations differ from this machine's "
                f"forward (max |diff| {run.store_diff:.3g}), so none was started from the store.")
    return f"Clean runs: all {live} batch(es) computed in full."


FEW_STEPS = 2000
"""Below this many optimizer steps an SAE has not converged: its numbers do not rank methods."""
PAPER_STEPS = 100_000_000 // 4096


def short_training(saes: list[LoadedSAE]) -> str | None:
    """A warning when an SAE trained for too few steps for its numbers to rank methods, else None."""
    steps = {s.name: s.training.get("steps") for s in saes if isinstance(s.training.get("steps"), int)}
    short = {name: n for name, n in steps.items() if n < FEW_STEPS}
    if not short:
        return None
    fewest = min(short.values())
    return (f"{len(short)} of these SAEs trained for fewer than {FEW_STEPS:,} steps (the fewest: {fewest:,}): far too "
            f"few to rank methods, which these numbers then do not; the RouteSAE paper trains on 100M tokens, about "
            f"{PAPER_STEPS:,} steps of 4,096 tokens. Harvest more tokens or fit with more --epochs.")


L0_TOLERANCE = 0.1
"""Relative L0 difference beyond which rows are not compared at equal sparsity."""


def l0_mismatch(rows: list[Row]) -> str | None:
    """A warning when the rows' L0 differ by more than L0_TOLERANCE, else None."""
    measured = [(row.cache.l0, row.name) for row in rows if math.isfinite(row.cache.l0) and row.cache.l0 > 0]
    if len(measured) < 2:
        return None
    (low, low_name), (high, high_name) = min(measured), max(measured)
    if high <= low * (1 + L0_TOLERANCE):
        return None
    return (f"L0 differs by more than {L0_TOLERANCE:.0%} between rows ({low:.1f} for {low_name}, {high:.1f} for "
            f"{high_name}): reconstruction and KL are only comparable at equal sparsity; fit with matching --k "
            "(vanilla, gated and jumprelu are steered to it) or --target-l0.")


L0_TARGET_TOLERANCE = 0.25
"""Relative distance of an SAE's held-out L0 from the L0 it was fitted for beyond which eval warns."""


def l0_target(s: LoadedSAE) -> float | None:
    """The L0 a fit aimed this SAE at, where its L0 may drift from it (vanilla and gated steered
    toward k, JumpReLU's penalty aiming at k); None where k latents fire by construction (TopK and
    its kin), where a fixed --sparsity-coef set no target, or where no fit recorded one (imports)."""
    coder = getattr(s.sae, "coder", None)
    fit = s.training.get("fit")
    if coder is None or getattr(coder, "fixed_l0", True) or not isinstance(fit, dict):
        return None
    if fit.get("sparsity_coef") is not None and not getattr(coder, "targets_l0_itself", False):
        return None
    target = s.training.get("target_l0") or s.sae.config.k
    return float(target) if target and target > 0 else None


def l0_off_target(saes: list[LoadedSAE], rows: list[Row]) -> list[str]:
    """One warning per SAE whose held-out L0 is more than L0_TARGET_TOLERANCE away from its
    target (see l0_target); its rows get the target in `l0_target`."""
    warnings = []
    for s in saes:
        target = l0_target(s)
        own = [row for row in rows if row.path == str(s.path) and row.routing in ("-", "router", "layer")]
        if target is None or not own:
            continue
        for row in own:
            row.l0_target = target
        l0 = own[0].cache.l0
        if not math.isfinite(l0) or abs(l0 - target) <= L0_TARGET_TOLERANCE * target:
            continue
        warnings.append(
            f"{s.name}: held-out L0 {l0:.1f} is far from its target {target:g} ({(l0 - target) / target:+.0%}, beyond "
            f"±{L0_TARGET_TOLERANCE:.0%}): its figures are those of an SAE at L0 {l0:.1f}, not {target:g}; the l0 of "
            "its metrics.jsonl shows how training went (a longer fit, more --epochs or --tokens, lets the sparsity "
            "control get there)")
    return warnings


def run_eval(cfg: EvalConfig) -> Report:
    """Evaluate cfg.saes on cfg.cache; returns the report (the CLI prints and writes it)."""
    if (cfg.batch_size is not None and cfg.batch_size < 1) or cfg.batch_tokens < 1:
        raise RouteSAEError("--batch-size must be at least 1")
    if cfg.prefix not in PREFIXES:
        raise RouteSAEError(f"--prefix {cfg.prefix!r}: use {' or '.join(PREFIXES)}")
    bad = [b for b in cfg.baselines if b not in BASELINES]
    if bad:
        raise RouteSAEError(f"unknown baseline {bad[0]!r}; choose from {', '.join(BASELINES)} (or none)")
    cache = Cache.open(cfg.cache, require_complete=True)
    raise_if_damaged(cache)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()  # the LLM's and the LM head's temporaries are reused, not faulted in afresh
    saes = load_saes(cfg.saes, device)
    for s in saes:
        check_compatible(s, cache)
    start, stop = held_out_range(cache, saes, cfg.all_tokens, cfg.tokens)
    pairs = build_targets(saes, cfg.baselines, cfg.seed)
    targets = [t for _, t in pairs]

    loaded, splice_run, spliceable = None, None, []
    if cfg.splice:
        # Load (and check) the model before the cache pass, so a bad model fails fast.
        _phase(cfg, f"loading {cfg.model or cache.model.get('id')} to splice into ...")
        loaded = load_store_model(cache.path, cache.model, cfg.model, cfg.device, "splice into")
        llm_device = next(loaded.model.parameters()).device
        for s in saes:
            s.sae.to(llm_device)

    _phase(cfg, f"scoring {_names(targets)} on {stop - start:,} store tokens (cache metrics) ...")
    cache_run = evaluate_cache_per_context(cache, targets, start, stop, cfg.batch_tokens, cfg.progress)
    cache_results = cache_run.results
    report = Report(str(cache.path), cache.model, (start, stop), not cfg.all_tokens, cache_results[0].n_tokens,
                    cache.context_len, notes=list(NOTES))
    rows = []
    for (s, t), cr in zip(pairs, cache_results):
        per_layer = t.sae is not s.sae or isinstance(t, LayerOfJointTarget)
        rows.append(Row(t.name, str(s.path), t.arch, "layer" if per_layer else t.routing if t.routed else "-",
                        t.written_layers, t.config.k, t.config.n_latents, cr, layer_of=s.name if per_layer else None))
    report.rows = rows
    for warning in (short_training(saes), l0_mismatch(rows)):
        if warning:
            _say(report, warning)
    for warning in l0_off_target(saes, rows):
        _say(report, warning, "warning")

    used = {t.routing for t in targets if t.routed and t.routing != "router"}
    for b in BASELINES:
        if b in used:
            report.notes.append(f"[{b}]: {ROUTING_NOTES[b]}; the RouteSAE's own dictionary.")

    if loaded is not None:
        spliceable = [i for i, t in enumerate(targets) if t.can_splice]
        skipped = [t for t in targets if not t.can_splice]
        for i, t in enumerate(targets):
            if not t.can_splice:
                rows[i].splice_note = t.cannot_splice_reason
        if skipped:
            _say(report, f"Not spliced: {', '.join(t.name for t in skipped)}: {skipped[0].cannot_splice_reason}.")
        if spliceable:
            batch_size = cfg.batch_size or cache.harvest_batch_size or 8
            _phase(cfg, f"splicing {_names([targets[i] for i in spliceable])} into the model: "
                        f"{(stop - start) // cache.context_len:,} contexts in batches of {batch_size} ...")
            run = splice_metrics(loaded.model, cache, [targets[i] for i in spliceable], start, stop,
                                 batch_size,
                                 # an int8 store's values are not the model's: every clean run is live
                                 "live" if cache.quantized else cfg.prefix, cfg.progress)
            for i, r in zip(spliceable, run.results):
                rows[i].splice = r
            report.notes.extend(n.format(ctx=cache.context_len) for n in SPLICE_NOTES)
            report.notes.append(f"CE of the clean model on these positions: {run.results[0].ce_clean:.4f} nats.")
            report.notes.append(_prefix_note(run))
            if run.zero_contexts["shared"]:
                ran, shared = run.zero_contexts["run"], run.zero_contexts["shared"]
                report.notes.append(
                    f"Zero-ablations: {shared} of {ran + shared} context runs were those of an identical context "
                    "(zeroing every non-special position leaves only the special tokens, so contexts with the same "
                    "ones continue the same) and were computed once.")
            report.splice_batches = run.batches
            splice_run = run
    report.per_context = _per_context(rows, cache.context_len, cache_run, splice_run, spliceable)
    _add_layer_means(report)
    return report


def _per_context(rows: list[Row], context_len: int, cache_run: CacheRun, splice_run: SpliceRun | None,
                 spliced: list[int]) -> PerContext:
    """The rows' sums per context (evaluate.per_context): the cache pass's for every row and, when
    some row was spliced, the splice's (NaN on the others). The layer-mean rows are left out: their
    figures are means of their per-layer rows', re-formed from those."""
    metrics = {name: np.stack([c[name] for c in cache_run.per_context]) for name in cache_run.per_context[0]}
    if splice_run is not None:
        if not np.array_equal(splice_run.contexts, cache_run.contexts):  # both walk [start, stop) in order
            raise RuntimeError("the splice measured other contexts than the cache pass")
        for name in SPLICE_METRICS:
            m = np.full((len(rows), len(cache_run.contexts)), np.nan)
            for i, sums in zip(spliced, splice_run.per_context):
                m[i] = sums[name]
            metrics[name] = m
    return PerContext([r.name for r in rows], cache_run.contexts, metrics, context_len,
                      [r.layer_of or "" for r in rows])


def _phase(cfg: EvalConfig, text: str) -> None:
    """One line as a phase of the command starts (silenced with the bars by --quiet)."""
    if cfg.progress:
        tqdm.write(text, file=sys.stderr)


def _names(targets: list[Target]) -> str:
    names = [t.name for t in targets]
    return names[0] if len(names) == 1 else f"{len(names)} rows ({', '.join(names[:4])}" + (", ...)" if len(names) > 4 else ")")


def _say(report: Report, note: str, kind: str = "note") -> None:
    """A note that changes how the table reads: in the report, and once on the terminal (--quiet
    silences progress bars, not this). kind 'warning': something is off with an SAE itself; the
    report lists it among its warnings too."""
    report.notes.append(note if kind == "note" else f"Warning: {note}")
    if kind == "warning":
        report.warnings.append(note)
    tqdm.write(f"routesae: {kind}: {note}", file=sys.stderr)


def _add_layer_means(report: Report) -> None:
    """After each multi-layer SAE's per-layer rows (contiguous), the row of their mean, labelled as such."""
    rows, out = report.rows, []
    for i, row in enumerate(rows):
        out.append(row)
        following = rows[i + 1].layer_of if i + 1 < len(rows) else None
        if row.layer_of is not None and following != row.layer_of:
            out.append(layer_mean_row(row.layer_of, [r for r in rows if r.layer_of == row.layer_of]))
    if len(out) > len(rows):
        report.notes.append("MLSAE and crosscoder: one row per layer, each layer's activations replaced alone by "
                            "their reconstruction (the crosscoder's from the code of all its clean layers; later "
                            "layers run on the modified stream), then the mean over layers of each figure.")
    report.rows = out
