"""`routesae reproduce --plan`: the stages, the disk each store needs, and how long each stage should
take, from this machine's own measurements where it has them (every finished stage records its
rate in ~/.cache/routesae/stage-rates.json), else a rough figure marked as an estimate."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any, NamedTuple

from routesae.atomic_files import write_json
from routesae.reproduce.config import Experiment
from routesae.reproduce.stages import Stage

RATES = Path(os.environ.get("ROUTESAE_CACHE", Path.home() / ".cache" / "routesae")) / "stage-rates.json"

# Rough seconds per unit on a 2-core CPU for a model of REFERENCE_SIZE (SmolLM2-135M: 30 blocks of
# width 576), measured once here; other models scale by blocks x width^2, a GPU by GPU_SPEEDUP.
# They are labelled as estimates wherever they are used.
ROUGH_SECONDS = {"harvest": 1 / 400, "fit": 1 / 4500, "eval": 1 / 200, "contexts": 1 / 2000, "dashboard": 30.0,
                 "judge": 120.0, "probe-data": 900.0, "probe": 60.0, "absorption": 300.0, "steer": 30.0}
REFERENCE_SIZE = 30 * 576**2
GPU_SPEEDUP = 100.0
MULTI_LAYER_COST = {"mlsae": "layers", "crosscoder": "layers"}
"""Archs whose training work grows with the layers they read (the rest read one code per token)."""


class PlannedStage(NamedTuple):
    stage: Stage
    seconds: float | None
    measured: bool
    disk_bytes: int | None


def machine_id() -> str:
    """This machine as the rates file knows it: host, cores and accelerator."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"{platform.node()}|{os.cpu_count()}|{device}"


def _units(stage: Stage) -> float:
    """The stage's work in the unit its rate is per."""
    w = stage.work
    if stage.kind in ("harvest", "fit"):
        return float(w.get("tokens", 0))
    if stage.kind in ("eval", "contexts"):
        return float(w.get("tokens", 0) * w.get("saes", 1))
    if stage.kind in ("probe", "absorption"):
        return float(w.get("saes", 1))
    return 1.0


def rate_key(stage: Stage, exp: Experiment) -> str:
    """What a measured rate is for: the stage kind, the model, and what changes its cost per unit."""
    extra = ""
    if stage.kind == "fit":
        options = exp.fit_options(stage.work.get("arch", ""))
        extra = f"|{stage.work.get('arch')}|x{options.get('expansion', 8)}|b{options.get('batch_size', 4096)}"
    elif stage.kind == "eval":
        extra = "|splice" if stage.work.get("splice") else "|cache"
    return f"{stage.kind}|{exp.grid.model}{extra}"


def read_rates() -> dict[str, Any]:
    try:
        return json.loads(RATES.read_text())
    except (OSError, ValueError):
        return {}


KEPT_RATES = 5
"""Measurements kept per stage kind and size (the plan takes their median)."""


def measured_rate(kept: Any) -> float | None:
    """The median of a stage's kept seconds per unit (a single number from older files too)."""
    if isinstance(kept, (int, float)):
        return float(kept)
    if not kept:
        return None
    return float(statistics.median(kept))


def record_rate(stage: Stage, exp: Experiment, seconds: float) -> None:
    """Keep this machine's seconds per unit of a stage that just ran (the next plan's figure)."""
    units = _units(stage)
    if units <= 0 or seconds <= 0:
        return
    rates = read_rates()
    mine = rates.setdefault(machine_id(), {})
    key = rate_key(stage, exp)
    before = mine.get(key, [])
    # the last few measurements, of which plans take the median: one run slowed by a pause or a
    # job beside it does not set the next plan's figure
    mine[key] = ([before] if isinstance(before, (int, float)) else list(before))[-(KEPT_RATES - 1):] + [seconds / units]
    RATES.parent.mkdir(parents=True, exist_ok=True)
    write_json(RATES, rates)


def plan(stages: list[Stage], exp: Experiment, shape: tuple[int, int, int] | None, on_gpu: bool) -> list[PlannedStage]:
    """Each stage's expected seconds (measured rate x work, else rough) and, for stores, disk bytes.
    shape: (blocks, width, stored layers) of the model, None when it is not known."""
    mine = read_rates().get(machine_id(), {})
    out = []
    for s in stages:
        units = _units(s)
        rate = measured_rate(mine.get(rate_key(s, exp)))
        measured = rate is not None
        if rate is None:
            rate = ROUGH_SECONDS.get(s.kind)
            if rate is not None and shape is not None and s.kind in ("harvest", "fit", "eval", "contexts"):
                blocks, width, stored = shape
                rate *= (blocks * width**2 if s.kind in ("harvest", "eval") else width**2 * 8) / (
                    REFERENCE_SIZE if s.kind in ("harvest", "eval") else 576**2 * 8)
                if s.kind == "fit" and s.work.get("arch") in MULTI_LAYER_COST:
                    rate *= stored
            if rate is not None and on_gpu:
                rate /= GPU_SPEEDUP
        seconds = None if rate is None else rate * units
        disk = None
        if s.kind in ("harvest",) and shape is not None:
            _, width, stored = shape
            disk = int(s.work["tokens"]) * (stored * width * 2 + 4)
        out.append(PlannedStage(s, seconds, measured, disk))
    return out


def plan_text(planned: list[PlannedStage], exp: Experiment, out: Path, done: set[str]) -> str:
    """The plan as the terminal shows it."""
    lines = [f"experiment {exp.name} ({exp.source}) -> {out}", ""]
    width = max(len(p.stage.name) for p in planned)
    total, unknown, rough = 0.0, 0, 0
    for p in planned:
        if p.stage.name in done:
            when = "finished"
        elif p.seconds is None:
            when, unknown = "unknown", unknown + 1
        else:
            total += p.seconds
            when = _fmt(p.seconds) + ("" if p.measured else " (estimate)")
            rough += not p.measured
        disk = f"  disk {_bytes(p.disk_bytes)}" if p.disk_bytes else ""
        lines.append(f"{p.stage.name:<{width}}  {when}{disk}")
    stores = sum(p.disk_bytes or 0 for p in planned)
    lines += ["", f"{len(planned)} stages ({len(done)} finished); to run: {_fmt(total)}"
              + (f" ({rough} stage times are rough estimates: not measured on this machine)" if rough else "")
              + (f"; {unknown} unknown" if unknown else ""),
              f"activation stores: {_bytes(stores)}" if stores else "activation stores: size unknown (model shape not known)"]
    return "\n".join(lines)


def store_shape(exp: Experiment) -> tuple[int, int, int] | None:
    """(blocks, width, stored layers) from [experiment] d_model/n_layers, else the model's config
    where it can be read without the hub; None if neither."""
    from routesae.model.hooks import parse_layers

    blocks, width = exp.grid.n_layers, exp.grid.d_model
    if blocks is None or width is None:
        try:
            from routesae.model.loading import config_n_layers, load_config

            config = load_config(exp.grid.model)
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            blocks = blocks or config_n_layers(config)
            width = width or int(getattr(text, "hidden_size", None) or getattr(text, "n_embd"))
        except Exception:  # the plan says "unknown" rather than fail on a model it cannot see
            return None
    stored = len(parse_layers(str(exp.stages["harvest"].get("layers", "middle")), blocks))
    return blocks, width, stored


def _fmt(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
