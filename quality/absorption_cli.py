"""`routesae absorption`: feature absorption on the first-letter task, per SAE (quality/absorption.py
says what is measured, quality/absorption_data.py which words and prompts).

The model is the one the SAEs' configs record (all SAEs given must record the same one), or
`--model` (a moved copy: another revision is refused), run in the recorded dtype where the device
multiplies it natively, else float32 (`--dtype auto`). The words go through it once per split,
batched; every SAE is then scored on the same residuals, probes and split. Writes absorption.json
and absorption.md to --out and prints one line per SAE.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from routesae.errors import RouteSAEError
from routesae.cli_args import rerun_model_options
from routesae.model.compute_dtype import CHOICES

POOR_SPELLERS = ("smollm2",)
"""Model ids (lower-cased substrings) SAEBench's caveat applies to: too small to know first letters well."""


@dataclass
class AbsorptionConfig:
    """The arguments of `routesae absorption`."""

    saes: list[str]
    """SAE folders (a fit output folder stands for all its SAEs); all must record the same model."""
    out: str
    """Folder for absorption.json and absorption.md."""
    model: str | None = None
    """Load the model from here instead of the SAEs' recorded model id."""
    max_words: int = 4000
    """Words used, a seeded sample of the vocabulary's (0: all); 80% train, 20% test."""
    min_probe_f1: float = 0.6
    """Letters the probe scores below this F1 on the test words are left out (SAEBench's 0.6)."""
    min_letters: int = 1
    """Fewest known letters an SAE is scored on; fewer is an error."""
    seed: int = 0
    """Seeds the split, the example lines and the fits."""
    batch_size: int = 32
    """Prompts per forward."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', 'cuda:N'."""
    dtype: str = "auto"
    """The model's compute dtype: 'auto' (the recorded dtype where the device multiplies it natively,
    else float32), 'float32', 'bfloat16' or 'float16'."""
    progress: bool = True
    """Progress bars on stderr."""


def _same_model(saes: list[Any]) -> dict[str, Any]:
    first = saes[0]
    recorded = dict(first.sae.config.model or {})
    for s in saes[1:]:
        theirs = s.sae.config.model or {}
        if (theirs.get("id"), theirs.get("revision")) != (recorded.get("id"), recorded.get("revision")):
            raise RouteSAEError(f"{s.name} records model {theirs.get('id')!r} (revision {theirs.get('revision')}), "
                                f"{first.name} {recorded.get('id')!r} (revision {recorded.get('revision')}): "
                                "score SAEs of one model per run")
    return recorded


def _where(layers: list[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}..{layers[-1]}"


def run_absorption(cfg: AbsorptionConfig) -> tuple[dict[str, Any], Path]:
    """Load the SAEs and their model, harvest the words, fit the probes, score every SAE; write the
    report. -> (the JSON-ready result, the output folder)."""
    import numpy as np
    from tqdm.auto import tqdm

    from routesae.atomic_files import write_json, write_text
    from routesae.model.loading import load_store_model, resolve_device
    from routesae.quality.absorption import AbsorptionSettings, fit_letter_probe, score_sae
    from routesae.quality.absorption_data import build_prompts, split_words, vocab_words, word_residuals
    from routesae.sae_folders import expand_sae_paths, load_saes

    started = time.time()
    if cfg.dtype not in CHOICES:
        raise RouteSAEError(f"--dtype {cfg.dtype!r}: use one of {', '.join(CHOICES)}")
    if cfg.max_words < 0:
        raise RouteSAEError(f"--max-words {cfg.max_words}: use a positive number, or 0 for all")
    if not 0 <= cfg.min_probe_f1 <= 1:
        raise RouteSAEError(f"--min-probe-f1 {cfg.min_probe_f1:g} is not between 0 and 1")
    settings = AbsorptionSettings(min_probe_f1=cfg.min_probe_f1, min_letters=max(1, cfg.min_letters), seed=cfg.seed)
    device = resolve_device(cfg.device)
    saes = load_saes(expand_sae_paths(cfg.saes), device)
    recorded = _same_model(saes)
    if not recorded.get("id") and cfg.model is None:
        raise RouteSAEError(f"{saes[0].path} records no model; pass --model")
    say = (lambda text: tqdm.write(text, file=sys.stderr)) if cfg.progress else (lambda text: None)
    say(f"loading {cfg.model or recorded.get('id')} ...")
    loaded = load_store_model(saes[0].path, recorded, cfg.model, cfg.device, "score absorption with", dtype=cfg.dtype)
    for s in saes:
        if s.sae.config.d_model != loaded.info["d_model"]:
            raise RouteSAEError(f"{s.name} reads d_model {s.sae.config.d_model}, "
                                f"the model has {loaded.info['d_model']}")
    tok = loaded.tokenizer
    split = split_words(vocab_words(tok), cfg.seed, cfg.max_words or None, what=f"the tokenizer of {loaded.info['id']}")
    layers = sorted({layer for s in saes for layer in s.sae.config.layers})
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    residuals = {}
    for part, words in (("train", split.train), ("test", split.test)):
        prompts = build_prompts(tok, words, split.train, seed=cfg.seed + (part == "test"))
        residuals[part] = word_residuals(loaded.model, prompts, layers, cfg.batch_size, pad, cfg.progress,
                                         desc=f"{part} words")
    y_train, y_test = [w.letter for w in split.train], [w.letter for w in split.test]
    probes = {}
    for layer in tqdm(layers, desc="probes", unit="layer", disable=not cfg.progress, dynamic_ncols=True):
        probes[layer] = fit_letter_probe(residuals["train"][layer], y_train, residuals["test"][layer], y_test, settings)
    scored = []
    for s in saes:
        sites = score_sae(s.sae, s.name, residuals["train"], residuals["test"], y_train, y_test, probes, settings)
        scored.append({
            "name": s.name, "path": str(s.path), "arch": s.sae.config.arch, "layers": list(s.sae.config.layers),
            "n_latents": s.sae.config.n_latents, "k": s.sae.config.k,
            "absorption": float(np.mean([x.absorption for x in sites])),
            "full_absorption": float(np.mean([x.full_absorption for x in sites])),
            "probe_f1": float(np.mean([x.probe_f1 for x in sites])),
            "sites": [{**x._asdict(), "letters": [r._asdict() for r in x.letters]} for x in sites],
        })
    model_id = str(loaded.info.get("id"))
    result = {
        "model": {key: loaded.info.get(key) for key in ("id", "revision", "dtype", "n_layers", "d_model")},
        "settings": {**asdict(settings), "max_words": cfg.max_words,
                     "probe": "sklearn LogisticRegression, class_weight='balanced', one vs rest per letter "
                              "(in place of SAEBench's Adam-trained BCE probe)",
                     "main_latents": "ranked by class-mean code difference, balanced LR on the top k"},
        "words": {"vocabulary": split.n_vocab_words, "train": len(split.train), "test": len(split.test)},
        "probes": {str(layer): {"letters": p.letters, "f1": [round(float(f), 4) for f in p.f1]}
                   for layer, p in probes.items()},
        "saes": scored,
        "poor_speller": any(name in f"{model_id} {recorded.get('id', '')}".lower() for name in POOR_SPELLERS),
        "seconds": round(time.time() - started, 2),
    }
    folder = Path(cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "absorption.json", result)
    write_text(folder / "absorption.md", markdown(result))
    return result, folder


def _letter_list(left_out: dict[str, float | None]) -> str:
    return ", ".join(f"{c} ({'too few words' if f is None else f'F1 {f:.2f}'})" for c, f in left_out.items())


def caveat(result: dict[str, Any]) -> str:
    """The sentence every report carries about the probe."""
    thr = result["settings"]["min_probe_f1"]
    text = (f"Every figure is given beside the first-letter probe's own F1 on the test words; letters whose probe F1 "
            f"is below {thr:g} are left out. ")
    if result["poor_speller"]:
        text += ("SmolLM2-135M knows first letters poorly (SAEBench uses models of 1B parameters and more): "
                 "its probe is weak and these absorption figures say little.")
    return text


def markdown(result: dict[str, Any]) -> str:
    m, w = result["model"], result["words"]
    lines = ["# Feature absorption (first-letter task)", "",
             f"Model {m['id']} ({m['dtype']}); {w['vocabulary']:,} single-token alphabetic words in its vocabulary, "
             f"{w['train']:,} train / {w['test']:,} test words used.", "", caveat(result), "",
             "| SAE | arch | site | absorption | full absorption | probe F1 | letters |",
             "|---|---|---|---:|---:|---:|---:|"]
    for s in result["saes"]:
        for site in s["sites"]:
            lines.append(f"| {s['name']} | {s['arch']} | {site['site']} | {site['absorption']:.3f} | "
                         f"{site['full_absorption']:.3f} | {site['probe_f1']:.2f} | {len(site['letters'])} |")
    for s in result["saes"]:
        for site in s["sites"]:
            lines += ["", f"## {s['name']} at {site['site']}", "",
                      "| letter | probe F1 | test words | probe true positives | main latents | k-sparse F1 | "
                      "absorption | full | absorbing latents |",
                      "|---|---:|---:|---:|---|---|---:|---:|---|"]
            for r in site["letters"]:
                lines.append(f"| {r['letter']} | {r['probe_f1']:.2f} | {r['test_words']} | {r['true_positives']} | "
                             f"{', '.join(map(str, r['main_latents'])) or '-'} | "
                             f"{', '.join(f'{f:.2f}' for f in r['main_f1'])} | {r['absorption']:.3f} | "
                             f"{r['full_absorption']:.3f} | {', '.join(map(str, r['absorbing_latents'])) or '-'} |")
            if site["left_out"]:
                lines += ["", f"Left out: {_letter_list(site['left_out'])}."]
    return "\n".join(lines) + "\n"


def summary(result: dict[str, Any], folder: Path) -> str:
    """One line per SAE, the caveat, and where the report is."""
    lines = []
    for s in result["saes"]:
        n_letters = sum(len(x["letters"]) for x in s["sites"]) / len(s["sites"])
        n_left = sum(len(x["left_out"]) for x in s["sites"]) / len(s["sites"])
        per = "" if len(s["sites"]) == 1 else f", mean of {len(s['sites'])} sites"
        lines.append(f"{s['name']} ({s['arch']}, {_where(s['layers'])}): absorption {s['absorption']:.3f}, "
                     f"full {s['full_absorption']:.3f} over {n_letters:g} letters{per} "
                     f"(probe F1 {s['probe_f1']:.2f}; {n_left:g} letters left out)")
    lines += [caveat(result), f"report: {folder / 'absorption.md'} (data: absorption.json)"]
    return "\n".join(lines)


@click.command("absorption")
@click.option("--sae", "saes", required=True, multiple=True, metavar="PATH",
              help="SAE folder, or a fit output folder (all its SAEs); repeatable. All must record one model.")
@click.option("--out", required=True, help="Folder for absorption.md and absorption.json.")
@click.option("--max-words", default=4000, show_default=True, type=int,
              help="Words used: a seeded sample of the vocabulary's single-token words (0: all), 80/20 train/test.")
@click.option("--min-probe-f1", default=0.6, show_default=True, type=float,
              help="Leave out letters whose probe scores below this F1 on the test words (SAEBench's 0.6).")
@click.option("--min-letters", default=1, show_default=True, type=int, help="Fewest known letters to score an SAE.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the split, example lines and fits.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Prompts per forward.")
@rerun_model_options
@click.option("--quiet", is_flag=True, help="No progress bars.")
def absorption(saes, out, max_words, min_probe_f1, min_letters, seed, batch_size, model, device, dtype, quiet) -> None:
    """Feature absorption on the first-letter task, as SAEBench scores it: a linear probe for a word's
    first letter on the residual, each letter's main latents by k-sparse probing, and the share of
    the probe's direction that other latents carry where the main latents stay silent. Reports the
    absorption fraction and full-absorption rate per letter and overall, each beside the probe's F1.

    Example: routesae absorption --sae runs --out absorption"""
    if batch_size < 1:
        raise RouteSAEError("--batch-size must be at least 1")
    result, folder = run_absorption(AbsorptionConfig(
        saes=list(saes), out=out, model=model, max_words=max_words, min_probe_f1=min_probe_f1,
        min_letters=min_letters, seed=seed, batch_size=batch_size, device=device, dtype=dtype, progress=not quiet))
    click.echo(summary(result, folder))
