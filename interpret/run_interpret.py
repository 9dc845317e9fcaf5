"""`routesae interpret`: an LLM judge reads a seeded sample of latents from a contexts folder
(formats.md) and scores them by the RouteSAE paper's protocol and by delphi's detection and fuzzing;
the result is one `interp.json` (formats.md, "interpretations"), written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
from routesae.atomic_files import write_json
from routesae.errors import RouteSAEError
from routesae.interpret import protocols as P
from routesae.interpret.choices import PROTOCOLS
from routesae.interpret.contexts import FORMAT as CONTEXTS_FORMAT
from routesae.interpret.contexts import VERSION as CONTEXTS_VERSION
from routesae.interpret.judge import Backend, Judge, JudgeConfig, ModeChoice

FORMAT = "routesae-interpretations"
VERSION = 1
HELD_OUT = ("detection", "fuzzing")


@dataclass
class InterpretConfig:
    """The arguments of `routesae interpret`."""

    contexts: str
    """A contexts folder of one SAE (written by `routesae contexts`)."""
    out: str
    """The interp.json to write."""
    judge_model: str
    """Model name on the server, or 'local:PATH' to run a local transformers chat model in-process."""
    judge_url: str | None = None
    """Base URL of an OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1); none for local:."""
    features: int = 100
    """Latents to draw (clamped, with a warning, to those with enough examples)."""
    seed: int = 0
    """Seed of the latent sample and of the held-out shuffles and fuzzing marks."""
    protocols: tuple[str, ...] = PROTOCOLS
    """Which to run: 'paper', 'detection', 'fuzzing'."""
    latents: list[int] | None = None
    """These latents instead of a sample."""
    min_examples: int = 4
    """A latent is drawn only with at least this many top examples (and, for detection or fuzzing,
    at least one held-out activating window and one negative)."""
    batch: int = 5
    """Held-out windows per request."""
    balance: bool = True
    """Score on as many negatives as activating windows (delphi's default), not every negative."""
    concurrency: int = 4
    """Requests in flight at once."""
    cache_dir: str | None = None
    """Reply cache (default: <out>.cache next to --out)."""
    max_retries: int = 5
    """Retries per request on connection errors, timeouts, 408, 409, 429 and 5xx (honouring Retry-After)."""
    temperature: float = 0.0
    """Judge sampling temperature (the RouteSAE paper used 0.1)."""
    max_tokens: int = 300
    """Longest judge reply in tokens."""
    timeout: float = 600.0
    """Seconds the judge may stay silent on a request (before its reply starts, or between two tokens of it)."""
    judge_mode: str = "auto"
    """How the judge's answers are made to parse (judge.JUDGE_MODES); auto detects it."""
    judge_tokenizer: str | None = None
    """The judge's tokenizer for logit_bias when the model name is no tokenizer folder."""
    overwrite: bool = False
    """Replace an --out that is not an interpretation of this SAE and store (by default refused)."""
    progress: bool = True
    """Show progress bars and what is being asked of whom."""

    def judge_config(self) -> JudgeConfig:
        return JudgeConfig(model=self.judge_model, url=self.judge_url, cache_dir=Path(self.cache_path),
                           temperature=self.temperature, max_tokens=self.max_tokens, concurrency=self.concurrency,
                           max_retries=self.max_retries, timeout=self.timeout, mode=self.judge_mode,
                           tokenizer=self.judge_tokenizer)

    @property
    def cache_path(self) -> str:
        return self.cache_dir or self.out + ".cache"


class Contexts(NamedTuple):
    """A contexts folder, read: the manifest, the vocabulary and each latent's line (parsed on demand)."""

    folder: Path
    manifest: dict[str, Any]
    vocab: P.Vocab
    lines: list[str]
    sizes: np.ndarray
    """[n_latents, 3]: how many top, samples and negatives each latent has."""

    def record(self, latent: int) -> dict[str, Any]:
        return json.loads(self.lines[latent])


class Selection(NamedTuple):
    latents: list[int]
    available: int
    """Latents with enough examples to be drawn."""
    clamped: bool
    """Fewer than --features were available: all of them were taken."""


class InterpretResult(NamedTuple):
    out: Path
    latents: list[int]
    summary: dict[str, Any]
    available: int
    clamped: bool
    requests: int
    """Replies the judge produced in this run."""
    cached: int
    """Replies read from the cache."""
    mode: ModeChoice
    """The judge mode that ran, and why."""


def load_contexts(folder: str | Path) -> Contexts:
    """Read a finished contexts folder; one-line errors for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RouteSAEError(f"no contexts folder at {folder}")
    manifest_path = folder / "contexts.json"
    if not manifest_path.is_file():
        subs = sorted(p.name for p in folder.iterdir() if (p / "contexts.json").is_file())
        if subs:
            raise RouteSAEError(f"{folder} holds the contexts of several SAEs; pass one of them, e.g. {folder / subs[0]}")
        raise RouteSAEError(f"{folder} has no contexts.json: not a finished contexts folder (run routesae contexts)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        raise RouteSAEError(f"{manifest_path} is not valid JSON: an unfinished or damaged contexts folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CONTEXTS_FORMAT:
        raise RouteSAEError(f"{manifest_path} is not a routesae contexts manifest")
    if manifest.get("version") != CONTEXTS_VERSION:
        raise RouteSAEError(f"{manifest_path} is contexts format version {manifest.get('version')}; this routesae reads {CONTEXTS_VERSION}")
    if manifest.get("complete") is not True:
        raise RouteSAEError(f"{folder} is an unfinished contexts pass (contexts.json not complete); rerun routesae contexts")
    try:
        texts = json.loads((folder / "tokens.json").read_text())
        lines = (folder / "latents.jsonl").read_text().splitlines()
    except FileNotFoundError as e:
        raise RouteSAEError(f"{folder} has no {Path(e.filename).name}: a damaged contexts folder") from None
    except ValueError:
        raise RouteSAEError(f"{folder / 'tokens.json'} is not valid JSON") from None
    n = int(manifest.get("sae", {}).get("n_latents", len(lines)))
    if len(lines) != n:
        raise RouteSAEError(f"{folder / 'latents.jsonl'} has {len(lines)} lines for {n} latents: a damaged contexts folder")
    sizes = np.zeros((n, 3), dtype=np.int64)
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            raise RouteSAEError(f"{folder / 'latents.jsonl'} line {i + 1} is not valid JSON") from None
        if rec.get("latent") != i:
            raise RouteSAEError(f"{folder / 'latents.jsonl'} line {i + 1} is latent {rec.get('latent')}, not {i}")
        sizes[i] = len(rec.get("top") or []), len(rec.get("samples") or []), len(rec.get("negatives") or [])
    return Contexts(folder, manifest, P.Vocab(texts), lines, sizes)


def select_latents(ctx: Contexts, cfg: InterpretConfig) -> Selection:
    """The latents to judge: cfg.latents as given, or the first cfg.features of a seeded permutation
    of the eligible ones (so a smaller --features draws a subset of a larger one, same seed)."""
    n = len(ctx.lines)
    held_out = any(p in HELD_OUT for p in cfg.protocols)
    ok = ctx.sizes[:, 0] >= cfg.min_examples
    if held_out:
        ok &= (ctx.sizes[:, 1] >= 1) & (ctx.sizes[:, 2] >= 1)
    eligible = np.nonzero(ok)[0]
    if cfg.latents is not None:
        bad = [i for i in cfg.latents if not 0 <= i < n]
        if bad:
            raise RouteSAEError(f"--latents {bad[0]} is out of range: the SAE has latents 0..{n - 1}")
        empty = [i for i in cfg.latents if ctx.sizes[i, 0] == 0]
        if empty:
            raise RouteSAEError(f"latent {empty[0]} never fired in these contexts: nothing to judge")
        return Selection(sorted(set(cfg.latents)), len(eligible), False)
    if cfg.features < 1:
        raise RouteSAEError("--features must be at least 1")
    if len(eligible) == 0:
        need = f"at least {cfg.min_examples} top examples" + (" and held-out windows" if held_out else "")
        raise RouteSAEError(f"no latent of {ctx.folder} has {need}")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(eligible)
    chosen = sorted(int(i) for i in order[: cfg.features])
    return Selection(chosen, len(eligible), cfg.features > len(eligible))


def check_config(cfg: InterpretConfig) -> None:
    unknown = [p for p in cfg.protocols if p not in PROTOCOLS]
    if unknown or not cfg.protocols:
        raise RouteSAEError(f"--protocols {','.join(cfg.protocols)!r}: use a comma-separated list of {', '.join(PROTOCOLS)}")
    if cfg.batch < 1:
        raise RouteSAEError("--batch must be at least 1")
    if cfg.min_examples < 1:
        raise RouteSAEError("--min-examples must be at least 1")
    if cfg.judge_model.startswith("local:") and cfg.judge_url:
        raise RouteSAEError("--judge-model local:PATH runs in-process: drop --judge-url")


def _sae_and_store(entry: dict[str, Any]) -> tuple[Any, Any]:
    """What names an SAE and its store in a contexts manifest (or interp.json's `contexts`): the
    weights' hash and the store's fingerprint, or the whole entries where those are missing."""
    sae = entry.get("sae") if isinstance(entry.get("sae"), dict) else {}
    store = entry.get("store") if isinstance(entry.get("store"), dict) else {}
    return sae.get("weights_sha256") or sae, store.get("fingerprint") or store


def check_out(out: Path, ctx: Contexts, overwrite: bool) -> None:
    """Refuse, before any request, an --out holding something else than an interpretation of this
    SAE and store (such a file is rewritten, what was asked before answered from the cache); with
    overwrite, any file is replaced."""
    if out.is_dir():
        raise RouteSAEError(f"--out {out} is a folder: interpret writes one JSON file (e.g. {out / 'interp.json'})")
    if overwrite or not out.exists():
        return
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise RouteSAEError(f"{out} exists and is not an output of routesae interpret; choose another --out, "
                            "or pass --overwrite to replace it")
    contexts = old.get("contexts") if isinstance(old.get("contexts"), dict) else {}
    if _sae_and_store(contexts) != _sae_and_store(ctx.manifest):
        sae = contexts.get("sae") if isinstance(contexts.get("sae"), dict) else {}
        raise RouteSAEError(f"{out} holds the interpretation of another SAE or store ({sae.get('name', 'unnamed')}, "
                            f"from {contexts.get('path', 'elsewhere')}); choose another --out, "
                            "or pass --overwrite to replace it")


def _paper_entry(answer: P.PaperAnswer | None, reply: str, source: str) -> dict[str, Any]:
    if answer is None:
        return {"parse_failure": True, "reply": reply, "source": source}
    return {**answer._asdict(), "source": source}


PAPER_FORMAT = {"type": "json_schema", "json_schema": {"name": "paper", "strict": True, "schema": P.PAPER_SCHEMA}}
ANSWER_HOW = {"logprobs": "logprobs", "logit_bias": "logit_bias", "constrained": "constrained"}
"""How each mode gets a one-token answer (Backend.complete's `answer`)."""
WITH_PROBABILITIES = ("logprobs", "constrained")
"""Modes whose one-token replies carry the judge's probabilities: detection and fuzzing get an AUROC."""


def _held_out_style(mode: str) -> str:
    return "list" if mode == "free" else "json" if mode == "json_schema" else "one"


def _held_out_extra(mode: str, batch: P.HeldOutBatch) -> dict[str, Any]:
    if mode == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "verdicts", "strict": True, "schema": P.held_out_schema(len(batch.truth))}}}
    if mode in ANSWER_HOW:
        return {"answer": {"choices": list(P.VERDICT_CHOICES), "how": ANSWER_HOW[mode]}}
    return {}


def _held_out_verdicts(mode: str, reply: str, n: int) -> tuple[list[int | None], list[float | None]]:
    """A held-out request's verdicts, and the judge's P(1) for each (None where its reply has none)."""
    style = _held_out_style(mode)
    if style == "one":
        verdict, p = P.verdict_of_choice(reply)
        return [verdict], [p]
    verdicts = P.parse_verdicts_json(reply, n) if style == "json" else P.parse_verdicts(reply, n)
    return verdicts, [None] * n


def run_interpret(cfg: InterpretConfig, backend: Backend | None = None,
                  warn: Callable[[str], None] | None = None) -> InterpretResult:
    """Judge the selected latents by every protocol asked for; writes cfg.out.

    backend: instead of the one cfg names (tests); warn: told, before any request, of a clamped --features."""
    check_config(cfg)
    ctx = load_contexts(cfg.contexts)
    check_out(Path(cfg.out), ctx, cfg.overwrite)
    selection = select_latents(ctx, cfg)
    if selection.clamped and warn is not None:
        warn(f"--features {cfg.features}, but only {selection.available} latents have enough examples: "
             f"judging all {selection.available}")
    judge = Judge(cfg.judge_config(), backend)
    held_out = [p for p in PROTOCOLS if p in cfg.protocols and p in HELD_OUT]
    records = {lat: ctx.record(lat) for lat in selection.latents}
    for rec in records.values():
        P.check_disjoint(rec)
    choice = judge.resolve_mode()
    mode = choice.mode
    entries: dict[int, dict[str, Any]] = {lat: {} for lat in selection.latents}

    # First round: what needs only the contexts (the paper's judgement, delphi's explanation). Where
    # one token among a few is all the judge can be made to give (logit_bias, constrained), the
    # paper's judgement is three questions: category, score, explanation.
    asks: list[tuple[int, str, Any]] = []
    conversations: list[P.Messages] = []
    extras: list[dict[str, Any]] = []
    for lat, rec in records.items():
        if "paper" in cfg.protocols:
            if mode in ("logit_bias", "constrained"):
                for what, system, choices in (("paper_category", P.PAPER_CATEGORY_SYSTEM, P.CATEGORY_DIGITS),
                                              ("paper_score", P.PAPER_SCORE_SYSTEM, P.SCORE_DIGITS),
                                              ("paper_explanation", P.PAPER_EXPLAIN_SYSTEM, None)):
                    messages, source = P.paper_messages(rec, ctx.vocab, system)
                    asks.append((lat, what, source))
                    conversations.append(messages)
                    extras.append({"answer": {"choices": list(choices), "how": ANSWER_HOW[mode]}} if choices else {})
            else:
                structured = mode in ("json_schema", "logprobs")
                messages, source = P.paper_messages(rec, ctx.vocab, P.PAPER_JSON_SYSTEM if structured else P.PAPER_SYSTEM)
                asks.append((lat, "paper", source))
                conversations.append(messages)
                extras.append({"response_format": PAPER_FORMAT} if structured else {})
        if held_out:
            asks.append((lat, "explanation", None))
            conversations.append(P.explanation_messages(rec, ctx.vocab))
            extras.append({})
    parts: dict[int, dict[str, str]] = {}
    for (lat, what, source), reply in zip(asks, judge.ask_many(conversations, "judge: contexts", cfg.progress, extras)):
        if what == "paper":
            parse = P.parse_paper_json if mode in ("json_schema", "logprobs") else P.parse_paper
            entries[lat]["paper"] = _paper_entry(parse(reply), reply, source)
        elif what.startswith("paper_"):
            parts.setdefault(lat, {})[what.removeprefix("paper_")] = reply
            if len(parts[lat]) == 3:
                got = parts[lat]
                answer = P.paper_from_choices(got["category"], got["score"], got["explanation"])
                entries[lat]["paper"] = _paper_entry(answer, f"category: {got['category']}; score: {got['score']}", source)
        else:
            explanation = P.parse_explanation(reply)
            entries[lat]["explanation"] = explanation
            if explanation is None:
                entries[lat]["explanation_reply"] = reply

    # Second round: held-out windows judged against each explanation.
    style = _held_out_style(mode)
    batches: list[tuple[int, str, P.HeldOutBatch]] = []
    for lat, rec in records.items():
        explanation = entries[lat].get("explanation")
        for p in held_out:
            if explanation is None:
                entries[lat][p] = None  # nothing to judge against: left out of the means
                continue
            rng = np.random.default_rng([cfg.seed, lat, PROTOCOLS.index(p)])
            windows = P.held_out_windows(rec, ctx.vocab, p, rng, cfg.balance)
            batches += [(lat, p, b) for b in P.held_out_batches(windows, explanation, p, cfg.batch, style)]
    replies = judge.ask_many([b.messages for _, _, b in batches], "judge: held-out", cfg.progress,
                             [_held_out_extra(mode, b) for _, _, b in batches]) if batches else []
    verdicts: dict[tuple[int, str], tuple[list[int], list[int | None], list[float | None]]] = {}
    for (lat, p, b), reply in zip(batches, replies):
        truth, predicted, probs = verdicts.setdefault((lat, p), ([], [], []))
        said, p1 = _held_out_verdicts(mode, reply, len(b.truth))
        truth += b.truth
        predicted += said
        probs += p1
    scored = mode in WITH_PROBABILITIES
    for (lat, p), (truth, predicted, probs) in verdicts.items():
        entries[lat][p] = P.binary_scores(truth, predicted, probs if scored else None)
    for lat in selection.latents:
        for p in held_out:
            entries[lat].setdefault(p, P.binary_scores([], [], [] if scored else None))

    summary: dict[str, Any] = {}
    if "paper" in cfg.protocols:
        summary["paper"] = P.summarize_paper([entries[lat]["paper"] for lat in selection.latents])
    for p in held_out:
        summary[p] = P.summarize_binary([entries[lat][p] for lat in selection.latents])
    jc = judge.cfg
    doc = {
        "format": FORMAT, "version": VERSION,
        "contexts": {"path": str(ctx.folder.resolve()), "sae": ctx.manifest.get("sae"), "store": ctx.manifest.get("store")},
        "judge": {"url": cfg.judge_model if jc.local else jc.url, "model": judge.model_id.removeprefix("local:")
                  if jc.local else jc.model, **jc.sampling(), "mode": mode, "mode_reason": choice.why},
        "protocols": [p for p in PROTOCOLS if p in cfg.protocols],
        "seed": cfg.seed, "features": len(selection.latents),
        "settings": {"min_examples": cfg.min_examples, "windows_per_request": 1 if style == "one" else cfg.batch,
                     "balance": cfg.balance, "mark_fraction": P.MARK_FRACTION,
                     "selected": "latents" if cfg.latents is not None else "sample", "available": selection.available},
        "latents": {str(lat): entries[lat] for lat in selection.latents},
        "summary": summary,
    }
    out = write_json(Path(cfg.out), doc, indent=1)
    return InterpretResult(out, selection.latents, summary, selection.available, selection.clamped, judge.requests,
                           judge.cached, choice)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(summary: dict[str, Any]) -> str:
    """The aggregates as markdown: the paper's scores, then delphi's."""
    lines = []
    if "paper" in summary:
        s = summary["paper"]
        c = s["counts"]
        lines += ["| paper | latents | mean score | low-level (n) | high-level (n) | undiscernible | parse failures |",
                  "|---|---:|---:|---:|---:|---:|---:|",
                  f"| | {s['latents']} | {_fmt(s['mean_score'], 2)} | {_fmt(s['mean_score_low_level'], 2)} ({c['low-level']}) "
                  f"| {_fmt(s['mean_score_high_level'], 2)} ({c['high-level']}) | {c['undiscernible']} | {s['parse_failures']} |"]
    held = [p for p in HELD_OUT if p in summary]
    if held:
        if lines:
            lines.append("")
        # AUROC where the judge's probabilities were read (logprobs and constrained modes)
        roc = any("auroc" in summary[p] for p in held)
        lines += ["| protocol | latents | balanced accuracy | precision | recall | F1 |" + (" AUROC |" if roc else "")
                  + " parse failures |", "|---|---:|---:|---:|---:|---:|" + ("---:|" if roc else "") + "---:|"]
        for p in held:
            s = summary[p]
            lines.append(f"| {p} | {s['latents']} | {_fmt(s['balanced_accuracy'])} | {_fmt(s['precision'])} | "
                         f"{_fmt(s['recall'])} | {_fmt(s['f1'])} |" + (f" {_fmt(s.get('auroc'))} |" if roc else "")
                         + f" {s['parse_failures']} |")
    return "\n".join(lines)
