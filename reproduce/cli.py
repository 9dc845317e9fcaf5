"""`routesae reproduce EXPERIMENT --out DIR`: run an experiment file (or a shipped preset) stage by
stage, resumably, and write its report. Heavy imports wait inside the command."""

from __future__ import annotations

import click


@click.command("reproduce")
@click.argument("experiment", metavar="EXPERIMENT")
@click.option("--out", required=True, help="The experiment's folder: stores, fits, evals, report (reused to resume).")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the stages, the disk each store needs and the time each should take; run nothing.")
@click.option("--report-only", is_flag=True, help="Write the report from the finished stages; run nothing.")
def reproduce(experiment, out, plan_only, report_only) -> None:
    """Run the paper's experiment end to end: harvest a training and a held-out store, fit every
    architecture at every k, seed and budget, evaluate (spliced into the LLM), find contexts,
    score quality, steer, and write one report with intervals over seeds and contexts.

    EXPERIMENT is a TOML file or a preset: demo, smollm2-cpu, paper. Killed anywhere and run again,
    it continues; a changed setting reruns what depends on it, and says so.

    Example: routesae reproduce demo --out runs/demo"""
    from pathlib import Path

    from routesae.reproduce.run import run_experiment

    run_experiment(experiment, Path(out), plan_only=plan_only, report_only=report_only)
