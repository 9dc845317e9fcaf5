"""The experiment from start to end: read and check the file, then plan, or run the unfinished stages
and write the report."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from routesae.atomic_files import write_text
from routesae.errors import RouteSAEError
from routesae.reproduce.config import Experiment, command_options, load_experiment
from routesae.reproduce.runner import experiment_lock, is_done, read_state, run_stages, stage_keys
from routesae.reproduce.stages import build_stages


def say(text: str) -> None:
    print(f"reproduce: {text}", file=sys.stderr, flush=True)


def check_inputs(exp: Experiment) -> None:
    """What would fail later, failed now in one line: the corpora exist, the layers and the context
    length fit the model (from its config, before any weights load)."""
    from routesae.harvest.corpus import document_source
    from routesae.model.loading import check_layers_and_length

    for which, corpus in (("train_corpus", exp.grid.train_corpus), ("heldout_corpus", exp.grid.heldout_corpus)):
        try:
            document_source(corpus)
        except RouteSAEError as e:
            raise RouteSAEError(f"[experiment] {which}: {e}") from None
    defaults = command_options("harvest")
    harvest = exp.stages["harvest"]
    layers = str(harvest.get("layers", defaults["layers"].default))
    length = int(harvest.get("context_len", defaults["context_len"].default))
    try:
        check_layers_and_length(exp.grid.model, None, layers, length, "[harvest] context_len")
    except RouteSAEError as e:
        raise RouteSAEError(f"[harvest] layers {layers!r}: {e}") from None


def run_experiment(spec: str, out: Path, plan_only: bool = False, report_only: bool = False) -> None:
    exp = load_experiment(spec)
    out = out.expanduser().absolute()
    stages = build_stages(exp, out)
    if plan_only:
        from routesae.reproduce.plan import plan, plan_text, store_shape

        import torch

        keys = stage_keys(stages, out)
        state = read_state(out) if out.exists() else {"stages": {}}
        done = {s.name for s in stages if is_done(state, s, keys[s.name])}
        on_gpu = torch.cuda.is_available()
        print(plan_text(plan(stages, exp, store_shape(exp), on_gpu), exp, out, done))
        print(f"times for this machine: {torch.cuda.get_device_name(0) if on_gpu else 'CPU only'}, "
              f"{os.cpu_count()} cores; a stage measured here before uses its own rate")
        return
    if not report_only:
        check_inputs(exp)  # before the folder is made: a bad file leaves nothing behind
    with experiment_lock(out):
        write_text(out / "experiment.toml", Path(exp.source).read_text(encoding="utf-8"))
        if not report_only:
            from routesae.reproduce.plan import record_rate

            started = time.perf_counter()
            say(f"{exp.name}: {len(stages)} stages in {out}")
            run_stages(stages, out, log=say, on_done=lambda stage, seconds: record_rate(stage, exp, seconds))
            say(f"all stages finished ({(time.perf_counter() - started) / 60:.1f} min this run)")
        from routesae.reproduce.report import write_report

        paths = write_report(exp, stages, out)
        say(f"report: {paths[0]}")
