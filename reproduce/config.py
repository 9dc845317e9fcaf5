"""An experiment file (TOML) read, checked and resolved into the settings `routesae reproduce` runs.

The file names the experiment's grid in `[experiment]` and, per stage, the options of the command
that runs it, by their long names (`batch_size = 1024` is `routesae fit --batch-size 1024`): the
commands stay the one place an option is defined and documented, and a key no command has is an
error here, before anything runs. The options the experiment sets itself (where stores and SAEs
live, the grid's arch/k/seed/budget) are refused in the stage tables.

Parsing is the standard library's tomllib (tomli on Python 3.10); checking is our own because it is
checking against the click commands themselves, which no schema library knows about.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from routesae.errors import RouteSAEError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRESETS = ("demo", "smollm2-cpu", "paper")
"""The experiment files shipped in reproduce/presets/."""

# stage table -> (the routesae command whose options it holds, the options the experiment sets itself)
STAGE_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "harvest": ("harvest", ("model", "dataset", "tokens", "out", "overwrite", "quiet")),
    "fit": ("fit", ("cache", "arch", "k", "seed", "out", "overwrite", "progress")),
    "eval": ("eval", ("sae", "cache", "out", "json", "csv", "plots", "quiet")),
    "contexts": ("contexts", ("sae", "cache", "out", "overwrite", "quiet")),
    "dashboard": ("dashboard", ("contexts", "out", "interp", "sae", "quiet")),
    "judge": ("interpret", ("contexts", "out", "overwrite", "quiet")),
    "probe_data": ("probe-data", ("model", "out", "overwrite", "quiet", "list")),
    "probe": ("probe", ("store", "sae", "out", "quiet")),
    "absorption": ("absorption", ("sae", "out", "model", "quiet")),
    "steer": ("steer", ("sae", "json", "model")),
}
OPTIONAL_STAGES = ("contexts", "dashboard", "judge", "probe_data", "probe", "absorption")
"""Stages that run only when their table is present (and has no `enabled = false`)."""


@dataclass
class Grid:
    """What is trained: every arch at every k, seed and budget."""

    model: str
    """The LLM: a hub id, a local folder, a .gguf file, or 'smollm2' (the offline model)."""
    train_corpus: str
    """The training store's text (`routesae harvest --dataset`)."""
    heldout_corpus: str
    """The held-out store's text: other text than the training corpus."""
    train_tokens: str
    """Tokens of the training store (a count: 262144, 100M)."""
    heldout_tokens: str
    """Tokens of the held-out store."""
    archs: list[str]
    """Architectures, by fit's names (topk, routesae, mlsae, crosscoder, ...)."""
    k: list[int]
    """Sparsities (fit's --k; the L0 every row aims at)."""
    seeds: list[int]
    """Training seeds; intervals over seeds need two or more."""
    budgets: list[float]
    """Fractions of the full training budget (the last, 1.0, is the main table's)."""
    reference: str = "routesae"
    """The architecture the paired comparisons put against each other one."""
    d_model: int | None = None
    """The model's width, for --plan before the model is on disk (read from the model otherwise)."""
    n_layers: int | None = None
    """The model's block count, likewise."""


@dataclass
class Experiment:
    """A checked experiment: its grid and each stage's options (command option name -> value)."""

    name: str
    """The experiment's name (a preset's, or the file's stem)."""
    source: str
    """The file it was read from."""
    grid: Grid
    """What is trained and compared."""
    stages: dict[str, dict[str, Any]]
    """Stage table -> the options of its command (absent: the stage does not run)."""
    fit_arch: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-architecture fit options over [fit]'s (the table [fit.arch.NAME])."""
    steer: list[dict[str, Any]] = field(default_factory=list)
    """Steering examples: arch, k, latent, prompt and steer's options."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "grid": vars(self.grid), "stages": self.stages,
                "fit_arch": self.fit_arch, "steer": self.steer}

    def fit_options(self, arch: str) -> dict[str, Any]:
        """[fit] with [fit.arch.ARCH] over it."""
        return {**self.stages["fit"], **self.fit_arch.get(arch, {})}


def preset_path(name: str) -> Path:
    """The shipped experiment file of a preset name."""
    return Path(str(resources.files("routesae.reproduce") / "presets" / f"{name}.toml"))


def load_experiment(spec: str) -> Experiment:
    """A preset name or a TOML file -> a checked Experiment; one-line RouteSAEError otherwise."""
    path = preset_path(spec) if spec in PRESETS else Path(spec).expanduser()
    if not path.is_file():
        raise RouteSAEError(f"no experiment file {spec!r}: give a .toml file or a preset ({', '.join(PRESETS)})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RouteSAEError(f"{path}: not valid TOML: {e}") from None
    return parse_experiment(raw, str(path), spec if spec in PRESETS else path.stem)


_GRID_REQUIRED = ("model", "train_corpus", "heldout_corpus", "train_tokens", "heldout_tokens", "archs", "k", "seeds")


def parse_experiment(raw: dict[str, Any], source: str, name: str) -> Experiment:
    """The TOML's tables -> an Experiment, every key checked (see the module docstring)."""
    known = {"experiment", "steer", *STAGE_TABLES}
    for key in raw:
        if key not in known:
            raise RouteSAEError(f"{source}: unknown table [{key}]; known: {', '.join(sorted(known))}")
    exp = raw.get("experiment")
    if not isinstance(exp, dict):
        raise RouteSAEError(f"{source}: no [experiment] table (model, corpora, archs, k, seeds, ...)")
    grid = _grid(exp, source)
    stages: dict[str, dict[str, Any]] = {}
    fit_arch: dict[str, dict[str, Any]] = {}
    for table, (command, own) in STAGE_TABLES.items():
        if table == "steer":
            continue
        options = dict(raw.get(table, {})) if table in raw or table not in OPTIONAL_STAGES else None
        if options is None or options.pop("enabled", True) is False:
            continue
        if table == "fit":
            arch_tables = options.pop("arch", {})
            for arch, opts in arch_tables.items():
                if arch not in grid.archs:
                    raise RouteSAEError(f"{source}: [fit.arch.{arch}]: {arch!r} is not among [experiment] archs")
                fit_arch[arch] = _checked(opts, command, own + ("tokens", "epochs"), f"[fit.arch.{arch}]", source)
        stages[table] = _checked(options, command, own, f"[{table}]", source)
    if "tokens" in stages["fit"] and "epochs" in stages["fit"]:
        raise RouteSAEError(f"{source}: [fit] gives both tokens and epochs; the full budget is one of them")
    steer = [_steer_example(i, ex, grid, source) for i, ex in enumerate(raw.get("steer", []))]
    return Experiment(name, source, grid, stages, fit_arch, steer)


def _grid(exp: dict[str, Any], source: str) -> Grid:
    fields_ = {f for f in Grid.__dataclass_fields__}
    for key in exp:
        if key not in fields_:
            raise RouteSAEError(f"{source}: [experiment] unknown key {key!r}; known: {', '.join(sorted(fields_))}")
    missing = [key for key in _GRID_REQUIRED if key not in exp]
    if missing:
        raise RouteSAEError(f"{source}: [experiment] lacks {', '.join(missing)}")
    values = dict(exp)
    values.setdefault("budgets", [1.0])
    for key in ("train_tokens", "heldout_tokens"):
        values[key] = str(values[key])
    for key, kind in (("archs", str), ("k", int), ("seeds", int), ("budgets", (int, float))):
        items = values[key]
        if not isinstance(items, list) or not items or not all(isinstance(x, kind) and not isinstance(x, bool)
                                                                 for x in items):
            raise RouteSAEError(f"{source}: [experiment] {key} must be a non-empty list of "
                                f"{'numbers' if key == 'budgets' else kind.__name__ + 's'}")
        if len(set(items)) != len(items):
            raise RouteSAEError(f"{source}: [experiment] {key} repeats a value")
    budgets = sorted(float(b) for b in values["budgets"])
    if budgets[0] <= 0 or budgets[-1] != 1.0:
        raise RouteSAEError(f"{source}: [experiment] budgets are fractions in (0, 1] of the full budget, 1.0 among them")
    values["budgets"] = budgets
    from routesae.train.saes import ARCHITECTURES

    for arch in values["archs"]:
        if arch not in ARCHITECTURES:
            raise RouteSAEError(f"{source}: [experiment] unknown arch {arch!r}; choose from "
                                f"{', '.join(sorted(ARCHITECTURES))}")
    if values.get("reference", "routesae") not in values["archs"]:
        raise RouteSAEError(f"{source}: [experiment] reference {values.get('reference', 'routesae')!r} is not among archs")
    return Grid(**values)


def _checked(options: dict[str, Any], command: str, own: tuple[str, ...], where: str, source: str) -> dict[str, Any]:
    """options' keys against the command's own options; values kept as given (the command parses them)."""
    params = command_options(command)
    for key, value in options.items():
        if key in own:
            raise RouteSAEError(f"{source}: {where} {key!r} is set by the experiment itself, not in this table")
        if key not in params:
            raise RouteSAEError(f"{source}: {where} unknown key {key!r}: `routesae {command}` has no option "
                                f"--{key.replace('_', '-')}")
        if isinstance(value, (dict, list)) and not (isinstance(value, list) and params[key].multiple):
            raise RouteSAEError(f"{source}: {where} {key}: give a single value")
    return dict(options)


def command_options(command: str) -> dict[str, Any]:
    """A routesae command's options by their long flag with '_' for '-' (`max_new_tokens` for
    --max-new-tokens) -> the click.Option objects of the command itself."""
    import click

    from routesae.cli import COMMANDS

    module, attr, _ = COMMANDS[command]
    cmd = getattr(__import__(module, fromlist=[attr]), attr)
    return {max(p.opts, key=len).lstrip("-").replace("-", "_"): p for p in cmd.params if isinstance(p, click.Option)}


def _steer_example(i: int, ex: dict[str, Any], grid: Grid, source: str) -> dict[str, Any]:
    where = f"[[steer]] #{i + 1}"
    for key in ("arch", "k", "latent", "prompt"):
        if key not in ex:
            raise RouteSAEError(f"{source}: {where} lacks {key!r} (arch, k, latent, prompt; then steer's options)")
    if ex["arch"] not in grid.archs or ex["k"] not in grid.k:
        raise RouteSAEError(f"{source}: {where}: {ex['arch']} at k {ex['k']} is not trained by this experiment")
    rest = {key: value for key, value in ex.items() if key not in ("arch", "k", "latent", "prompt")}
    _checked(rest, "steer", STAGE_TABLES["steer"][1] + ("latent", "prompt", "prompts"), where, source)
    if not (isinstance(ex["latent"], int) or ex["latent"] == "top"):
        raise RouteSAEError(f"{source}: {where}: latent is a number or 'top' (the most frequent interpretable latent)")
    return dict(ex)


def argv(command: str, options: dict[str, Any]) -> list[str]:
    """Stage options -> the command's words: `x_y = v` is `--x-y v`; a flag true alone, false left
    off (or `--no-x` where the option has that form); a list repeats a repeatable option."""
    params = command_options(command)
    words: list[str] = []
    for key, value in options.items():
        param = params[key]
        flag = max(param.opts, key=len)
        if param.is_flag or param.secondary_opts:
            if value:
                words.append(flag)
            elif param.secondary_opts:
                words.append(max(param.secondary_opts, key=len))
        elif isinstance(value, list):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return words


def fingerprint(value: Any) -> str:
    """A short stable hash of JSON-ready settings."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
