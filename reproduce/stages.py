"""An experiment as a list of stages: each one an existing routesae command with its arguments, the
folder it writes, and what its output depends on (its own settings and the stages it reads).

The output folder of an experiment (model space of files, not of activations):

    stores/train.zarr  stores/heldout.zarr  stores/probes.zarr
    fits/budget-B/seed-S/ARCH/           one fit per arch, seed and budget (every k in it)
    evals/budget-B/seed-S/               report.json, per_context.npz: every arch of that seed and budget
    contexts/NAME  dashboards/NAME  judge/NAME.json     the first seed at the full budget
    quality/probe/seed-S  quality/absorption/seed-S     every seed at the full budget
    steer/N.json                         the steering examples
    report/                              report.html, report.md, results.json, plots
    state.json                           which stage finished with which settings
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from routesae.cli_args import parse_count
from routesae.errors import RouteSAEError
from routesae.reproduce.config import Experiment, argv

DEFAULT_EVAL_FRACTION = 0.05
"""fit's --eval-tokens default: the tail of the training store it holds out (the plan's arithmetic)."""


@dataclass
class Stage:
    """One command of the experiment."""

    name: str
    """Unique and readable: 'fit budget-0.5 seed-1 topk'."""
    kind: str
    """What the plan times it as: harvest, fit, eval, contexts, dashboard, judge, probe-data, probe, absorption, steer."""
    command: str
    """The routesae command."""
    args: list[str]
    """Its arguments."""
    out: Path
    """The folder (or file) it writes; removed before a rerun with other settings."""
    settings: dict[str, Any]
    """What its output depends on besides the stages in `needs`."""
    needs: list[str] = field(default_factory=list)
    """Stages whose output it reads."""
    resumable: bool = False
    """Whether running the command again continues an interrupted run (harvest, fit)."""
    stdout_to: Path | None = None
    """Where its standard output goes (steer --json), else the terminal."""
    work: dict[str, Any] = field(default_factory=dict)
    """Sizes the plan estimates its time and disk from (tokens, SAEs, ...)."""
    resolve: Callable[[list[str]], list[str]] | None = None
    """Fills in, just before the stage runs, what only an earlier stage's output tells (steer's
    latent 'top'); its key is taken before, from `args`."""


def budget_tag(fraction: float) -> str:
    return f"budget-{fraction:g}"


def fit_folder(out: Path, fraction: float, seed: int, arch: str) -> Path:
    return out / "fits" / budget_tag(fraction) / f"seed-{seed}" / arch


def sae_folder(exp: Experiment, out: Path, fraction: float, seed: int, arch: str, k: int) -> Path:
    """One SAE's folder: fit writes a lone SAE into --out itself, several into ARCH-kK subfolders."""
    folder = fit_folder(out, fraction, seed, arch)
    return folder if len(exp.grid.k) == 1 else folder / f"{arch}-k{k}"


def sae_name(exp: Experiment, arch: str, k: int) -> str:
    """The name eval and contexts give that SAE (its folder's name)."""
    return arch if len(exp.grid.k) == 1 else f"{arch}-k{k}"


def _budget_option(exp: Experiment, arch: str, fraction: float) -> tuple[dict[str, Any], int]:
    """The fit option of a budget (--tokens or --epochs scaled) and the tokens it trains on (plan)."""
    options = exp.fit_options(arch)
    train = parse_count(exp.grid.train_tokens, "[experiment] train_tokens")
    split = int(train * (1 - DEFAULT_EVAL_FRACTION))
    if "tokens" in options:
        full = parse_count(str(options["tokens"]), "[fit] tokens")
        tokens = max(1, round(full * fraction))
        return {"tokens": str(tokens)}, tokens
    epochs = float(options.get("epochs", 1.0)) * fraction
    return {"epochs": f"{epochs:g}"}, int(split * epochs)


def build_stages(exp: Experiment, out: Path) -> list[Stage]:
    """Every stage of the experiment, in the order they run."""
    g = exp.grid
    st = exp.stages
    stores = out / "stores"
    train, heldout = stores / "train.zarr", stores / "heldout.zarr"
    stages: list[Stage] = []
    for which, corpus, tokens, path in (("train", g.train_corpus, g.train_tokens, train),
                                        ("heldout", g.heldout_corpus, g.heldout_tokens, heldout)):
        own = {"model": g.model, "dataset": corpus, "tokens": tokens}
        stages.append(Stage(f"harvest {which}", "harvest", "harvest",
                            argv("harvest", {**own, **st["harvest"]}) + ["--out", str(path)], path,
                            {**own, **st["harvest"]}, resumable=True,
                            work={"tokens": parse_count(tokens, f"[experiment] {which}_tokens")}))

    full = g.budgets[-1]
    k_list = ",".join(str(k) for k in g.k)
    for fraction in g.budgets:
        for seed in g.seeds:
            fits = []
            for arch in g.archs:
                budget, trained = _budget_option(exp, arch, fraction)
                options = {k: v for k, v in exp.fit_options(arch).items() if k not in ("tokens", "epochs")}
                folder = fit_folder(out, fraction, seed, arch)
                name = f"fit {budget_tag(fraction)} seed-{seed} {arch}"
                fits.append(name)
                stages.append(Stage(
                    name, "fit", "fit",
                    ["--cache", str(train), "--arch", arch, "--k", k_list, "--seed", str(seed)]
                    + argv("fit", {**options, **budget}) + ["--out", str(folder)], folder,
                    {"arch": arch, "k": g.k, "seed": seed, **options, **budget}, ["harvest train"], resumable=True,
                    work={"tokens": trained * len(g.k), "arch": arch}))
            folder = out / "evals" / budget_tag(fraction) / f"seed-{seed}"
            saes = [str(fit_folder(out, fraction, seed, arch)) for arch in g.archs]
            stages.append(Stage(
                f"eval {budget_tag(fraction)} seed-{seed}", "eval", "eval",
                [*saes, "--cache", str(heldout)] + argv("eval", st["eval"]) + ["--out", str(folder)], folder,
                dict(st["eval"]), ["harvest heldout", *fits],
                work={"tokens": parse_count(g.heldout_tokens, "heldout_tokens"),
                      "saes": len(g.archs) * len(g.k), "splice": bool(st["eval"].get("splice"))}))

    first = g.seeds[0]
    full_fits = {seed: [f"fit {budget_tag(full)} seed-{seed} {arch}" for arch in g.archs] for seed in g.seeds}
    names = [(arch, k, sae_name(exp, arch, k)) for arch in g.archs for k in g.k]
    if "contexts" in st:
        folder = out / "contexts"
        stages.append(Stage(
            "contexts", "contexts", "contexts",
            [*(str(fit_folder(out, full, first, a)) for a in g.archs), "--cache", str(heldout)]
            + argv("contexts", st["contexts"]) + ["--out", str(folder)], folder, dict(st["contexts"]),
            ["harvest heldout", *full_fits[first]],
            work={"tokens": parse_count(g.heldout_tokens, "heldout_tokens"), "saes": len(names)}))
        for arch, k, name in names:
            interp = None
            if "judge" in st:
                interp = out / "judge" / f"{name}.json"
                stages.append(Stage(
                    f"judge {name}", "judge", "interpret",
                    ["--contexts", str(folder / name)] + argv("interpret", st["judge"]) + ["--out", str(interp)],
                    interp, dict(st["judge"]), ["contexts"]))
            if "dashboard" in st:
                dash = out / "dashboards" / name
                stages.append(Stage(
                    f"dashboard {name}", "dashboard", "dashboard",
                    ["--contexts", str(folder / name)] + argv("dashboard", st["dashboard"])
                    + (["--interp", str(interp)] if interp else []) + ["--out", str(dash)], dash,
                    dict(st["dashboard"]), ["contexts"] + ([f"judge {name}"] if interp else [])))

    probes = stores / "probes.zarr"
    if "probe_data" in st:
        options = {"layers": st["harvest"].get("layers", "middle"), **st["probe_data"]}
        stages.append(Stage("probe-data", "probe-data", "probe-data",
                            ["--model", g.model] + argv("probe-data", options) + ["--out", str(probes)], probes,
                            {"model": g.model, **options}))
    for seed in g.seeds:
        saes = [str(fit_folder(out, full, seed, arch)) for arch in g.archs]
        if "probe" in st and "probe_data" in st:
            folder = out / "quality" / "probe" / f"seed-{seed}"
            stages.append(Stage(
                f"probe seed-{seed}", "probe", "probe",
                ["--store", str(probes)] + [w for s in saes for w in ("--sae", s)] + argv("probe", st["probe"])
                + ["--out", str(folder)], folder, dict(st["probe"]), ["probe-data", *full_fits[seed]],
                work={"saes": len(names)}))
        if "absorption" in st:
            folder = out / "quality" / "absorption" / f"seed-{seed}"
            stages.append(Stage(
                f"absorption seed-{seed}", "absorption", "absorption",
                [w for s in saes for w in ("--sae", s)] + argv("absorption", st["absorption"]) + ["--out", str(folder)],
                folder, dict(st["absorption"]), full_fits[seed], work={"saes": len(names)}))

    for i, ex in enumerate(exp.steer):
        options = {key: value for key, value in ex.items() if key not in ("arch", "k", "latent", "prompt")}
        path = out / "steer" / f"{i + 1}.json"
        sae = sae_folder(exp, out, full, first, ex["arch"], ex["k"])
        needs = [f"fit {budget_tag(full)} seed-{first} {ex['arch']}"]
        resolve = None
        if ex["latent"] == TOP:
            if "contexts" not in st:
                raise RouteSAEError(f"{exp.source}: [[steer]] #{i + 1}: latent 'top' needs a [contexts] table")
            needs.append("contexts")
            resolve = _top_latent_resolver(out / "contexts" / sae_name(exp, ex["arch"], ex["k"]))
        stages.append(Stage(
            f"steer {i + 1}", "steer", "steer",
            ["--sae", str(sae), "--latent", str(ex["latent"]), "--prompt", ex["prompt"]] + argv("steer", options)
            + ["--json"], path, dict(ex), needs, stdout_to=path, resolve=resolve))
    return stages


TOP = "top"
"""A steering example's latent chosen by the experiment: the interpretable latent (contexts' rule)
that fires most often on the held-out store, else the most frequent one."""


def top_latent(contexts: Path) -> int:
    """The latent TOP names, from a contexts folder's latents.jsonl."""
    best: tuple[bool, int, int] | None = None
    path = contexts / "latents.jsonl"
    if not path.exists():
        raise RouteSAEError(f"{contexts} has no latents.jsonl: its contexts did not finish")
    with open(path) as handle:
        for line in handle:
            d = json.loads(line)
            rank = (bool(d.get("interpretable")), int(d.get("count", 0)), -int(d["latent"]))
            if best is None or rank > best:
                best = rank
    if best is None or best[1] == 0:
        raise RouteSAEError(f"{contexts}: no latent fires on the held-out store; give [[steer]] a latent number")
    return -best[2]


def _top_latent_resolver(contexts: Path) -> Callable[[list[str]], list[str]]:
    def resolve(args: list[str]) -> list[str]:
        i = args.index("--latent")
        return [*args[:i + 1], str(top_latent(contexts)), *args[i + 2:]]
    return resolve
