"""The reader of the judge-free quality outputs, for the stages that show them (eval's report, the
dashboard): `routesae probe` (probe.json), `routesae absorption` (absorption.json) and
`routesae synth-score` (synth_score.json), each given as its output folder or its JSON file.

What each kind is comes from the JSON's own keys, never from its file name alone. Per SAE, keyed by
its folder path as resolved here (synth_score.json records none: its SAEs are keyed by name), the
headline figures: probing test AUC (mean over datasets) at k=1 and k=16, or the nearest k probed,
beside the random-latent baseline at the same k and the dense probe; the absorption and
full-absorption rates beside the letter probe's F1 and the letters kept; MCC, the share of true
features recovered and RouteSAE's routing accuracy. Per latent: the probing datasets it serves
(picked among the k latents of a dataset at the output's smallest k) and its absorption partners
(per letter, the main latents and the latents that absorbed that letter's words).

Only json and the standard library are imported: eval's and dashboard's --help stay light.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from routesae.errors import RouteSAEError

KINDS = ("probe", "absorption", "synth")
FILES = {"probe": "probe.json", "absorption": "absorption.json", "synth": "synth_score.json"}
"""The file each command writes into its --out folder."""
TARGET_KS = (1, 16)
"""The probing ks the reports show (the nearest probed k where one is absent)."""


class QualityOutput(NamedTuple):
    """One quality output read."""

    given: str
    """The path as the user gave it (a folder may hold several outputs)."""
    file: Path
    """The JSON file read."""
    kind: str
    """'probe', 'absorption' or 'synth'."""
    data: dict[str, Any]
    """The JSON, as the command wrote it."""

    @property
    def sae_names(self) -> list[str]:
        return [str(s.get("name")) for s in self.data["saes"]]


class ProbeFigures(NamedTuple):
    """One SAE's probing headline (mean over datasets of the test AUC)."""

    source: str
    """The probe.json read."""
    k_low: int
    """The k shown for k=1 (the nearest probed)."""
    k_high: int
    """The k shown for k=16 (the nearest probed)."""
    auc_low: float | None
    auc_high: float | None
    random_low: float | None
    """k_low random live latents."""
    random_high: float | None
    dense: float | None
    """Logistic regression on the residual (multi-layer SAEs: their best layer by validation AUC)."""
    n_datasets: int
    code: str
    """Which code was probed ('routed code', ...)."""


class AbsorptionFigures(NamedTuple):
    """One SAE's first-letter absorption (means over its sites: an MLSAE's or crosscoder's layers)."""

    source: str
    """The absorption.json read."""
    absorption: float
    full_absorption: float
    probe_f1: float
    """The letter probe's mean F1 over the letters kept."""
    letters: list[str]
    """Letters scored at any of its sites."""
    left_out: dict[str, float | None]
    """Letters left out at some site -> the probe's F1 there (None: too few words)."""
    min_probe_f1: float
    poor_speller: bool
    """The model is one SAEBench's caveat names (knows first letters poorly)."""
    caveat: str
    """The result's own sentence about its probe."""


class SynthFigures(NamedTuple):
    """One SAE's planted-feature recovery on a synthetic store."""

    source: str
    """The synth_score.json read."""
    mcc: float | None
    recovered: float | None
    threshold: float
    """|cos| at which a true feature counted as recovered."""
    routing_accuracy: float | None
    """RouteSAE on a store with one-layer features; else None."""


class SAEFigures(NamedTuple):
    """Everything the outputs say about one SAE."""

    key: str
    """Its folder path resolved, or its name where the output records no path."""
    name: str
    path: str | None
    """The folder as recorded."""
    probe: ProbeFigures | None = None
    absorption: AbsorptionFigures | None = None
    synth: SynthFigures | None = None


class ProbingUse(NamedTuple):
    """A dataset a latent serves: it is among the k latents picked for it at the smallest k probed."""

    dataset: str
    k: int
    auc: float | None
    """That k's test AUC for the dataset."""
    layer: int | None
    """An MLSAE's layer whose code picked it; None for the others."""


class AbsorptionPartner(NamedTuple):
    """One letter a latent takes part in, and the latents on the other side."""

    letter: str
    site: str
    """'layer 6', 'routed over 4..8'."""
    role: str
    """'main': one of the letter's main latents, `partners` absorbed its words; 'absorbing': it
    absorbed the letter's words from the main latents `partners`."""
    partners: list[int]
    absorption: float
    """The letter's absorption fraction at that site."""


class LatentFacts(NamedTuple):
    """What the outputs say about one latent."""

    probing: list[ProbingUse]
    partners: list[AbsorptionPartner]


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) or math.isinf(v) else float(v)


def _resolved(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


# --- reading and telling the kinds apart ----------------------------------------------------------

def kind_of(data: Any) -> str | None:
    """'probe', 'absorption', 'synth' or None, from the keys the commands write."""
    if not isinstance(data, dict) or not isinstance(data.get("saes"), list):
        return None
    if isinstance(data.get("ks"), list) and isinstance(data.get("rows"), list) and "datasets" in data:
        return "probe"
    if isinstance(data.get("probes"), dict) and isinstance(data.get("settings"), dict) and "poor_speller" in data:
        return "absorption"
    if "threshold" in data and "placement" in data and "token_range" in data:
        return "synth"
    return None


def _check(data: dict[str, Any], kind: str, file: Path) -> None:
    """The fields the readers below use, one line where one is missing."""
    need = {"probe": ("name", "path", "summary"), "absorption": ("name", "path", "absorption", "full_absorption",
                                                                  "probe_f1", "sites"),
            "synth": ("name", "mcc", "recovered")}[kind]
    for s in data["saes"]:
        missing = [k for k in need if not isinstance(s, dict) or k not in s]
        if missing:
            raise RouteSAEError(f"{file} is a damaged {FILES[kind]}: an SAE entry lacks {missing[0]!r}")


def read_json_output(file: Path, given: str) -> QualityOutput:
    """One JSON file; a one-line error unless it is a quality output."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RouteSAEError(f"{file} is not readable JSON ({why})") from None
    kind = kind_of(data)
    if kind is None:
        raise RouteSAEError(f"{file} is not a quality output (probe.json, absorption.json or synth_score.json "
                            "of routesae probe, absorption or synth-score)")
    _check(data, kind, file)
    return QualityOutput(given, file, kind, data)


def read_outputs(path: str) -> list[QualityOutput]:
    """The outputs at one path: a JSON file, or a folder holding probe.json, absorption.json and/or
    synth_score.json; a one-line error for anything else."""
    p = Path(path)
    if p.is_file():
        return [read_json_output(p, path)]
    if p.is_dir():
        files = [p / FILES[k] for k in KINDS if (p / FILES[k]).is_file()]
        if not files:
            raise RouteSAEError(f"{p} is not a quality output: it holds no {', '.join(FILES.values())} "
                                "(the --out of routesae probe, absorption or synth-score)")
        return [read_json_output(f, path) for f in files]
    raise RouteSAEError(f"no quality output at {p}")


# --- per-SAE figures ------------------------------------------------------------------------------

def nearest_k(ks: list[int], target: int) -> int:
    """The probed k closest to target (the smaller on a tie)."""
    return min(ks, key=lambda k: (abs(k - target), k))


def probe_figures(out: QualityOutput, s: dict[str, Any]) -> ProbeFigures:
    ks = sorted(int(k) for k in out.data["ks"])
    sm = s["summary"]
    low, high = (nearest_k(ks, t) for t in TARGET_KS)

    def at(method: str, k: int) -> float | None:
        return _num((sm.get(method) or {}).get(str(k), (sm.get(method) or {}).get(k)))

    return ProbeFigures(str(out.file), low, high, at("sae", low), at("sae", high), at("random", low),
                        at("random", high), _num(sm.get("dense")), len(out.data.get("datasets") or []),
                        str(s.get("code", "")))


def absorption_figures(out: QualityOutput, s: dict[str, Any]) -> AbsorptionFigures:
    from routesae.quality.absorption_cli import caveat

    letters: list[str] = []
    left_out: dict[str, float | None] = {}
    for site in s["sites"]:
        for r in site.get("letters") or []:
            if r["letter"] not in letters:
                letters.append(r["letter"])
        for c, f1 in (site.get("left_out") or {}).items():
            left_out.setdefault(c, _num(f1))
    return AbsorptionFigures(str(out.file), float(s["absorption"]), float(s["full_absorption"]), float(s["probe_f1"]),
                             sorted(letters), dict(sorted(left_out.items())),
                             float(out.data["settings"].get("min_probe_f1", math.nan)),
                             bool(out.data.get("poor_speller")), caveat(out.data))


def synth_figures(out: QualityOutput, s: dict[str, Any]) -> SynthFigures:
    return SynthFigures(str(out.file), _num(s.get("mcc")), _num(s.get("recovered")), float(out.data["threshold"]),
                        _num(s.get("routing_accuracy")))


def probing_uses(out: QualityOutput, name: str) -> dict[int, list[ProbingUse]]:
    """latent -> the datasets it serves in one probe.json: picked at the smallest k probed."""
    k = min(int(k) for k in out.data["ks"])
    uses: dict[int, list[ProbingUse]] = defaultdict(list)
    for r in out.data["rows"]:
        if r.get("sae") == name and r.get("method") == "sae" and r.get("k") == k:
            for latent in r.get("latents") or []:
                uses[int(latent)].append(ProbingUse(str(r["dataset"]), k, _num(r.get("auc")), r.get("layer")))
    return uses


def absorption_partners(s: dict[str, Any]) -> dict[int, list[AbsorptionPartner]]:
    """latent -> its letters in one absorption.json entry: as a main latent (with the latents that
    absorbed the letter's words) and as an absorbing latent (with the letter's main latents)."""
    out: dict[int, list[AbsorptionPartner]] = defaultdict(list)
    for site in s["sites"]:
        for r in site.get("letters") or []:
            main = [int(i) for i in r.get("main_latents") or []]
            absorbing = [int(i) for i in r.get("absorbing_latents") or []]
            frac = float(r.get("absorption", 0.0))
            for i in main:
                out[i].append(AbsorptionPartner(r["letter"], site["site"], "main", absorbing, frac))
            for i in absorbing:
                out[i].append(AbsorptionPartner(r["letter"], site["site"], "absorbing", main, frac))
    return out


class QualityResults(NamedTuple):
    """Every output read, per SAE and per latent; look SAEs up with `figures` and `latents_of`."""

    outputs: list[QualityOutput]
    saes: dict[str, SAEFigures]
    """key (resolved folder path, or name) -> figures."""
    latents: dict[str, dict[int, LatentFacts]]
    """key -> latent -> facts."""
    warnings: list[str]
    """Figures given twice for one SAE (the first kept), one line each."""

    def keys_for(self, path: str | None, name: str | None) -> list[str]:
        """The entries of one SAE: its resolved folder path, and by name those whose recorded path
        is absent or names no folder here (another working directory, or synth_score.json)."""
        want = _resolved(path)
        keys = []
        for key, f in self.saes.items():
            if want is not None and f.path and _resolved(f.path) == want:
                keys.append(key)
            elif name is not None and f.name == name and not (f.path and Path(f.path).is_dir()):
                keys.append(key)
        return keys

    def figures(self, path: str | None, name: str | None) -> SAEFigures | None:
        """The figures of the SAE at `path` (falling back to `name`), merged over the outputs; None if none."""
        keys = self.keys_for(path, name)
        if not keys:
            return None
        merged = self.saes[keys[0]]
        for key in keys[1:]:
            other = self.saes[key]
            merged = merged._replace(**{kind: getattr(merged, kind) or getattr(other, kind)
                                        for kind in ("probe", "absorption", "synth")})
        return merged

    def latents_of(self, path: str | None, name: str | None) -> dict[int, LatentFacts]:
        """latent -> what the outputs say about it, for the SAE at `path` (or named `name`)."""
        out: dict[int, LatentFacts] = {}
        for key in self.keys_for(path, name):
            for i, facts in self.latents.get(key, {}).items():
                have = out.get(i, LatentFacts([], []))
                out[i] = LatentFacts(have.probing + facts.probing, have.partners + facts.partners)
        return out

    def unmatched(self, saes: list[tuple[str | None, str | None]], where: str) -> list[str]:
        """The paths given whose SAEs match none of `saes` ((path, name) pairs): one line each,
        ending '... is <where>'."""
        lines = []
        for given in dict.fromkeys(o.given for o in self.outputs):
            mine = [o for o in self.outputs if o.given == given]
            keys = {_key(o, s) for o in mine for s in o.data["saes"]}
            if not any(set(self.keys_for(p, n)) & keys for p, n in saes):
                names = sorted({n for o in mine for n in o.sae_names})
                shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                lines.append(f"--quality {given}: none of its SAEs ({shown}) is {where}")
        return lines


def _key(out: QualityOutput, s: dict[str, Any]) -> str:
    return _resolved(s.get("path")) or str(s.get("name"))


def load_quality(paths: list[str]) -> QualityResults:
    """Read every path (folder or JSON file) into per-SAE and per-latent figures; one-line errors for
    a path that is not a quality output."""
    outputs = [o for p in paths for o in read_outputs(p)]
    saes: dict[str, SAEFigures] = {}
    latents: dict[str, dict[int, LatentFacts]] = defaultdict(dict)
    warnings: list[str] = []
    for out in outputs:
        for s in out.data["saes"]:
            key, name = _key(out, s), str(s["name"])
            have = saes.get(key) or SAEFigures(key, name, s.get("path"))
            if getattr(have, out.kind) is not None:
                warnings.append(f"{out.file} gives {out.kind} figures for {name} again: those of "
                                f"{getattr(have, out.kind).source} are kept")
                continue
            if out.kind == "probe":
                saes[key] = have._replace(probe=probe_figures(out, s))
                for i, uses in probing_uses(out, name).items():
                    facts = latents[key].get(i, LatentFacts([], []))
                    latents[key][i] = facts._replace(probing=facts.probing + uses)
            elif out.kind == "absorption":
                saes[key] = have._replace(absorption=absorption_figures(out, s))
                for i, partners in absorption_partners(s).items():
                    facts = latents[key].get(i, LatentFacts([], []))
                    latents[key][i] = facts._replace(partners=facts.partners + partners)
            else:
                saes[key] = have._replace(synth=synth_figures(out, s))
    return QualityResults(outputs, saes, dict(latents), warnings)


# --- eval's quality table -----------------------------------------------------------------------

def table_row(row_name: str, f: SAEFigures) -> dict[str, Any]:
    """The flat figures of one report row (None where no output gives them)."""
    p, a, s = f.probe, f.absorption, f.synth
    return {
        "name": row_name, "sae": f.key,
        "probe_auc_k1": p.auc_low if p else None, "probe_k1": p.k_low if p else None,
        "probe_auc_k16": p.auc_high if p else None, "probe_k16": p.k_high if p else None,
        "random_auc_k1": p.random_low if p else None, "random_auc_k16": p.random_high if p else None,
        "dense_auc": p.dense if p else None, "probe_datasets": p.n_datasets if p else None,
        "absorption": a.absorption if a else None, "full_absorption": a.full_absorption if a else None,
        "absorption_probe_f1": a.probe_f1 if a else None, "absorption_letters": a.letters if a else None,
        "absorption_left_out": sorted(a.left_out) if a else None,
        "mcc": s.mcc if s else None, "recovered": s.recovered if s else None,
        "recovered_threshold": s.threshold if s else None, "routing_accuracy": s.routing_accuracy if s else None,
        "sources": [x.source for x in (p, a, s) if x is not None],
    }


def table_notes(used: list[SAEFigures]) -> list[str]:
    """What the quality table's columns are, once per output that gave a figure shown."""
    notes: list[str] = []
    probes = sorted({f.probe.source for f in used if f.probe})
    if probes:
        notes.append("Quality, probe AUC k1 / k16: test AUC of a logistic regression on the k latents of largest "
                     "class-mean difference on each dataset's training split, mean over datasets (routesae probe: "
                     f"{', '.join(probes)}); where k 1 or 16 was not probed the nearest k is shown beside the figure; "
                     "dense AUC: the same regression on the residual at the SAE's layer (multi-layer SAEs: their "
                     "best layer by validation AUC); k random live latents at the same ks are in report.json.")
    done: set[str] = set()
    for f in used:
        a = f.absorption
        if a is None or a.source in done:
            continue
        done.add(a.source)
        notes.append(f"Quality, absorption / full absorption ({a.source}): SAEBench's first-letter task, the mean "
                     "absorption fraction and the share of the letter probe's true positives fully absorbed by one "
                     "other latent, over the letters the probe knows (letters kept and the probe's F1 are in "
                     f"report.json). {a.caveat.strip()}"
                     + ("" if a.poor_speller else " On a model that spells poorly absorption is weak evidence."))
    synths = sorted({f.synth.source for f in used if f.synth})
    if synths:
        thr = ", ".join(sorted({f"{f.synth.threshold:g}" for f in used if f.synth}))
        notes.append("Quality, MCC / recovered: decoder rows against a synthetic store's true features (routesae "
                     f"synth-score: {', '.join(synths)}): the mean |cos| of the best one-to-one matching, and the "
                     f"share of true features some decoder row reaches at |cos| >= {thr}.")
    return notes
