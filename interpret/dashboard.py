"""`routesae dashboard`: a contexts folder (and optionally its interp.json) as static HTML, an index
of latents and a page per latent, that opens from file:// on an offline machine.

Reads the plain files formats.md describes; the LLM is loaded once, only for the decoder tokens
(unembed.py). Pages are written one by one, the index last and atomically, so an interrupted run
never leaves an index that links to a missing page."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from tqdm.auto import tqdm

from routesae.atomic_files import is_temp_name, write_text
from routesae.errors import RouteSAEError
from routesae.interpret import dashboard_html as H

CONTEXTS_FORMAT, INTERP_FORMAT = "routesae-contexts", "routesae-interpretations"
OWN_NAMES = ("index.html", "latents", "index.html.partial")
"""What a dashboard folder holds; anything else there means --out is somebody else's folder."""
_PAGE = re.compile(r"(\d+)\.html")


@dataclass
class DashboardConfig:
    """The arguments of `routesae dashboard`."""

    contexts: str
    """A contexts folder (one SAE's) from `routesae contexts`."""
    out: str
    """Output folder: index.html and latents/<i>.html."""
    interp: str | None = None
    """interp.json from `routesae interpret` on the same contexts folder."""
    latents: str | None = None
    """'N' (the first N latents) or a selection such as '3,17,40-49'; default all."""
    unembed: bool = True
    """Show each latent's top and bottom tokens through the unembedding (reads the model's output embedding alone)."""
    model: str | None = None
    """Load the model from here instead of the id the SAE records."""
    sae: str | None = None
    """The SAE folder, when the path contexts.json records does not resolve from here."""
    quality: list[str] = field(default_factory=list)
    """Outputs of routesae probe / absorption (folders or JSON): each latent's probing datasets and
    absorption partners."""
    progress: bool = True
    """Show a progress bar."""


class DashboardResult(NamedTuple):
    out: Path
    pages: int
    live: int
    dead: int
    seconds: float
    warnings: tuple[str, ...] = ()
    """One line each: a --quality output of none of this SAE's figures."""


@dataclass
class Contexts:
    """A finished contexts folder, its manifest read."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def n_latents(self) -> int:
        return int(self.manifest["sae"]["n_latents"])


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RouteSAEError(f"no {what} at {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RouteSAEError(f"{path} is not readable JSON ({why})") from None


def open_contexts(folder: str | os.PathLike) -> Contexts:
    """A contexts folder, checked finished and whole before anything is written."""
    path = Path(folder)
    if not path.is_dir():
        raise RouteSAEError(f"no contexts folder at {path}")
    if not (path / "contexts.json").is_file():
        several = sorted(p.name for p in path.iterdir() if (p / "contexts.json").is_file())
        if several:
            raise RouteSAEError(f"{path} holds the contexts of several SAEs ({', '.join(several[:4])}): "
                                f"pass one of them, e.g. {path / several[0]}")
        raise RouteSAEError(f"{path} holds no contexts.json: not a finished contexts folder (run routesae contexts)")
    m = _read_json(path / "contexts.json", "contexts.json")
    if not isinstance(m, dict) or m.get("format") != CONTEXTS_FORMAT:
        raise RouteSAEError(f"{path / 'contexts.json'} is not a routesae contexts manifest")
    if m.get("version") != 1:
        raise RouteSAEError(f"{path / 'contexts.json'} is version {m.get('version')!r}; this routesae reads version 1")
    if not m.get("complete"):
        raise RouteSAEError(f"{path} holds unfinished contexts; rerun routesae contexts")
    try:
        n = int(m["sae"]["n_latents"])
        m["settings"]["histogram_edges"]
    except (KeyError, TypeError, ValueError):
        raise RouteSAEError(f"{path / 'contexts.json'} lacks sae.n_latents or settings.histogram_edges") from None
    for name in ("latents.jsonl", "tokens.json"):
        if not (path / name).is_file():
            raise RouteSAEError(f"{path} has no {name}: an incomplete contexts folder; rerun routesae contexts")
    with open(path / "latents.jsonl", "rb") as f:
        lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
    if lines != n:
        raise RouteSAEError(f"{path / 'latents.jsonl'} holds {lines} lines for {n} latents: an incomplete contexts "
                            "folder; rerun routesae contexts")
    return Contexts(path, m)


def read_tokens(ctx: Contexts) -> list[str]:
    tokens = _read_json(ctx.folder / "tokens.json", "tokens.json")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise RouteSAEError(f"{ctx.folder / 'tokens.json'} is not a list of token texts")
    return tokens


def iter_latents(ctx: Contexts, wanted: set[int]) -> Iterator[dict[str, Any]]:
    """The records of `wanted` latents in latent order; the other lines are not parsed."""
    path = ctx.folder / "latents.jsonl"
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i not in wanted:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise RouteSAEError(f"{path} line {i + 1} is not valid JSON") from None
            if not isinstance(rec, dict) or rec.get("latent") != i:
                raise RouteSAEError(f"{path} line {i + 1} is not latent {i}'s record")
            yield rec


def parse_latents(text: str | None, n_latents: int) -> list[int]:
    """None -> all; 'N' -> the first N; '3,17,40-49' -> those (one latent alone: '17,' or '17-17')."""
    if text is None:
        return list(range(n_latents))
    text = text.strip()
    if re.fullmatch(r"[0-9_]+(\.[0-9]+)?[kKmM]?", text):
        from routesae.cli_args import parse_count

        n = parse_count(text, "--latents")
        if n < 1:
            raise RouteSAEError("--latents must be at least 1")
        return list(range(min(n, n_latents)))
    picked: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise RouteSAEError(f"--latents: {part!r} is not a latent or a range a-b (e.g. 3,17,40-49)")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if a > b or b >= n_latents:
            raise RouteSAEError(f"--latents: {part} is out of range (the SAE has latents 0 to {n_latents - 1})")
        picked.update(range(a, b + 1))
    if not picked:
        raise RouteSAEError("--latents names no latent")
    return sorted(picked)


def _same_contexts(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("tokens", "settings")
    return (all(a.get(k) == b.get(k) for k in keys)
            and (a.get("sae") or {}).get("weights_sha256") == (b.get("sae") or {}).get("weights_sha256")
            and (a.get("store") or {}).get("fingerprint") == (b.get("store") or {}).get("fingerprint"))


def read_interp(path: str | os.PathLike, ctx: Contexts) -> dict[str, Any]:
    """interp.json, checked to be of these contexts: the same SAE weights and store, and, when the
    contexts folder it names still exists elsewhere, the same contexts there."""
    p = Path(path)
    interp = _read_json(p, "interpretations file")
    if not isinstance(interp, dict) or interp.get("format") != INTERP_FORMAT:
        raise RouteSAEError(f"{p} is not a routesae interpretations file")
    if interp.get("version") != 1:
        raise RouteSAEError(f"{p} is version {interp.get('version')!r}; this routesae reads version 1")
    rec = interp.get("contexts")
    if isinstance(rec, str):
        rec = {"path": rec}
    if not isinstance(rec, dict):
        raise RouteSAEError(f"{p} names no contexts folder: cannot tell it is of {ctx.folder}")
    ours = ctx.manifest
    sha, our_sha = (rec.get("sae") or {}).get("weights_sha256"), ours["sae"].get("weights_sha256")
    if sha and sha != our_sha:
        raise RouteSAEError(f"{p} interprets another SAE ({(rec.get('sae') or {}).get('name', '?')}, other weights) "
                            f"than the contexts in {ctx.folder}")
    fp, our_fp = (rec.get("store") or {}).get("fingerprint"), (ours.get("store") or {}).get("fingerprint")
    if fp and fp != our_fp:
        raise RouteSAEError(f"{p} interprets contexts from another store than {ctx.folder}")
    where = rec.get("path") or rec.get("folder")
    there = Path(where) if where else None
    if there is not None and there.is_dir() and not _same_folder(there, ctx.folder):
        other = there / "contexts.json"
        try:
            same = _same_contexts(json.loads(other.read_text()), ours)
        except (OSError, ValueError):
            same = False
        if not same:
            raise RouteSAEError(f"{p} interprets the contexts folder {there}, not {ctx.folder}")
    elif not sha and (there is None or not there.is_dir()):
        raise RouteSAEError(f"{p} records neither the SAE's weights sha256 nor a contexts folder that exists: "
                            f"cannot tell it is of {ctx.folder}")
    latents = interp.get("latents") or {}
    if not isinstance(latents, dict):
        raise RouteSAEError(f"{p}: 'latents' is not an object keyed by latent index")
    for key, entry in latents.items():
        if not str(key).isdigit() or int(key) >= ctx.n_latents or not isinstance(entry, dict):
            raise RouteSAEError(f"{p} has an entry for latent {key!r}, but the SAE has latents 0 to "
                                f"{ctx.n_latents - 1}")
    return interp


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def _check_out(out: Path) -> None:
    """Refuse a folder that is not (or not yet) a dashboard, before the slow part."""
    if out.exists():
        if not out.is_dir():
            raise RouteSAEError(f"{out} exists and is not a folder")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_NAMES and not is_temp_name(p.name))
        if foreign:
            raise RouteSAEError(f"{out} holds other files ({foreign[0]}, ...): not a dashboard folder; "
                                "choose another --out")
        index = out / "index.html"
        if index.is_file() and f'content="{H.GENERATOR}"' not in index.read_text(errors="replace")[:2000]:
            raise RouteSAEError(f"{out}/index.html was not written by routesae dashboard; choose another --out")


def _write(path: Path, text: str) -> None:
    write_text(path, text, durable=False)


def _judge_fields(entry: dict[str, Any] | None) -> dict[str, Any]:
    """The index's judge columns of one latent."""
    if not entry:
        return {}
    paper = entry.get("paper") if isinstance(entry.get("paper"), dict) else {}

    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return {"score": num(paper.get("score")) if not paper.get("parse_failure") else None,
            "detection": num((entry.get("detection") or {}).get("balanced_accuracy")),
            "fuzzing": num((entry.get("fuzzing") or {}).get("balanced_accuracy")),
            "explanation": entry.get("explanation") or paper.get("explanation")}


def quality_of(cfg: DashboardConfig, ctx: Contexts, selection: list[int]
               ) -> tuple[dict[int, H.LatentQuality], list[str] | None, list[str]]:
    """-> (latent -> its quality facts, the outputs shown (None: no --quality), warning lines), for
    the SAE of these contexts: matched by its folder (--sae, else the one contexts.json records),
    else by its name."""
    if not cfg.quality:
        return {}, None, []
    from routesae.interpret.unembed import find_sae_folder
    from routesae.quality.results import load_quality

    results = load_quality(cfg.quality)
    sae = ctx.manifest.get("sae") or {}
    path, name = str(find_sae_folder(sae.get("path", ""), ctx.folder, cfg.sae)), sae.get("name")
    figures = results.figures(path, name)
    warnings = results.warnings + results.unmatched([(path, name)], "the SAE of these contexts")
    if figures is None:
        return {}, None, warnings
    if figures.probe is None and figures.absorption is None:
        return {}, None, warnings + [f"--quality: only synth-score figures for {name}, which are per SAE: no latent "
                                     "page shows them"]
    facts = results.latents_of(path, name)
    probe_k = None
    if figures.probe is not None:  # the smallest k of the probe output kept: the k its picks are of
        probe_k = next(min(int(k) for k in o.data["ks"]) for o in results.outputs
                       if o.kind == "probe" and str(o.file) == figures.probe.source)
    pages = frozenset(selection)
    out = {}
    for i in selection:
        f = facts.get(i)
        out[i] = H.LatentQuality(f.probing if f else [], f.partners if f else [], probe_k,
                                 figures.probe.n_datasets if figures.probe else 0, figures.absorption is not None,
                                 pages)
    shown = [x.source for x in (figures.probe, figures.absorption) if x is not None]
    return out, shown, warnings


def _quality_cells(q: H.LatentQuality | None) -> dict[str, list[str]]:
    """The index's Probing and Absorption cells of one latent."""
    if q is None:
        return {}
    roles = {"main": "main", "absorbing": "abs."}
    return {"probing": list(dict.fromkeys(u.dataset for u in q.probing)),
            "absorption": list(dict.fromkeys(f"{a.letter} ({roles[a.role]})" for a in q.partners))}


def run_dashboard(cfg: DashboardConfig) -> DashboardResult:
    """Write the dashboard of cfg.contexts into cfg.out."""
    from routesae.interpret.unembed import find_sae_folder, unembed_latents

    t0 = time.perf_counter()
    ctx = open_contexts(cfg.contexts)
    interp = read_interp(cfg.interp, ctx) if cfg.interp else None
    selection = parse_latents(cfg.latents, ctx.n_latents)
    quality, quality_shown, warnings = quality_of(cfg, ctx, selection)
    out = Path(cfg.out)
    _check_out(out)
    vis = H.token_texts(read_tokens(ctx))
    m = ctx.manifest
    if cfg.unembed:
        sae_path = find_sae_folder(m["sae"].get("path", ""), ctx.folder, cfg.sae)
        unembed = unembed_latents(sae_path, m["sae"].get("weights_sha256"), (m.get("store") or {}).get("path", ""),
                                  selection, cfg.model)
        tokens_of, note = unembed.latents, unembed.note
    else:
        tokens_of, note = {}, None
    (out / "latents").mkdir(parents=True, exist_ok=True)
    judged = (interp or {}).get("latents") or {}
    layers = m.get("layers")
    rows, dead = [], []
    bar = tqdm(total=len(selection), unit="page", desc="dashboard", disable=not cfg.progress, dynamic_ncols=True)
    for pos, rec in enumerate(iter_latents(ctx, set(selection))):
        i = rec["latent"]
        prev = selection[pos - 1] if pos > 0 else None
        nxt = selection[pos + 1] if pos + 1 < len(selection) else None
        entry = judged.get(str(i))
        _write(out / "latents" / f"{i}.html",
               H.latent_page(rec, ctx, vis, prev, nxt, entry, tokens_of.get(i), note, quality.get(i)))
        if rec.get("count"):
            top = rec.get("top") or []
            token = None
            if top and top[0].get("mark") is not None:
                tid = top[0]["token_ids"][top[0]["mark"]]
                token = vis[tid] if 0 <= tid < len(vis) else None
            rows.append({"latent": i, "frequency": float(rec.get("frequency", 0.0)), "count": int(rec["count"]),
                         "max": float(rec.get("max", 0.0)), "layer": H.top_layer(rec, layers),
                         "interpretable": bool(rec.get("interpretable")), "token": token, **_judge_fields(entry),
                         **_quality_cells(quality.get(i))})
        else:
            dead.append(i)
        bar.update(1)
    bar.close()
    _write(out / "index.html", H.index_page(ctx, rows, dead, interp, note, quality_shown))
    # pages of an earlier, larger selection: unlinked now that the new index is in place
    keep = set(selection)
    for p in (out / "latents").iterdir():
        match = _PAGE.fullmatch(p.name)
        if (match and int(match.group(1)) not in keep) or is_temp_name(p.name) or p.name.endswith(".partial"):
            p.unlink(missing_ok=True)
    return DashboardResult(out, len(selection), len(rows), len(dead), time.perf_counter() - t0, tuple(warnings))
