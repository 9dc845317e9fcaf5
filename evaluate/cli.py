"""`routesae eval`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from routesae.errors import RouteSAEError
from routesae.evaluate.choices import BASELINES
from routesae.cli_args import parse_count, sae_options, sae_paths

if TYPE_CHECKING:
    from routesae.evaluate.report import Report
    from routesae.quality.results import QualityResults


def _baselines(text: str) -> list[str]:
    text = text.strip().lower()
    if text in ("", "none"):
        return []
    if text in ("both", "all"):
        return list(BASELINES)
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BASELINES]
    if bad:
        raise RouteSAEError(f"unknown baseline {bad[0]!r}: use {', '.join(BASELINES)}, a comma list of them, or none")
    return names


@click.command("eval")
@sae_options
@click.option("--cache", required=True, help="The activation store (its held-out tail is evaluated).")
@click.option("--splice", is_flag=True, help="Reload the store's LLM and measure KL, delta-CE and loss recovered.")
@click.option("--all-tokens", is_flag=True, help="Evaluate on the whole store (one harvested for evaluation).")
@click.option("--tokens", default=None, help="At most this many tokens (whole contexts): 100k, 1M, 20000.")
@click.option("--baselines", default=",".join(BASELINES), show_default=True,
              help="Random-routing baselines for RouteSAEs: uniform, random-layer, both (comma list) or none.")
@click.option("--batch-size", default=None, type=int, help="Contexts per LLM forward (splice). Default: the harvest's, as the "
                   "store records it (else 8), which lets clean runs start from the store (see --prefix).")
@click.option("--model", default=None, help="Load the LLM from here instead of the store's model id (same revision).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--prefix", type=click.Choice(["auto", "live"]), default="auto", show_default=True,
              help="auto: start clean runs from the store's activations once they prove equal to the live forward's; "
                   "live: always recompute the whole forward.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random-layer baseline.")
@click.option("--json", "json_path", default=None, help="Write the full report as JSON here.")
@click.option("--csv", "csv_path", default=None, help="Write the table as CSV here.")
@click.option("--plots", default=None, help="Write PNG plots into this folder.")
@click.option("--out", default=None, help="Folder for report.md, report.json, report.csv and the plots.")
@click.option("--quality", "quality_paths", multiple=True, metavar="PATH",
              help="Output folder or JSON of routesae probe, absorption or synth-score (repeatable): their figures "
                   "for the SAEs evaluated in a Quality table (probe AUC k1/k16, dense AUC, absorption, full "
                   "absorption, MCC, recovered). SAEs are matched by folder, else by name.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_command(saes, more_saes, cache, splice, all_tokens, tokens, baselines, batch_size, model, device, prefix, seed,
                 json_path, csv_path, plots, out, quality_paths, quiet) -> None:
    """Score SAEs: NormMSE, FVU, L0, dead latents and routing from the cache; with --splice, KL,
    delta-CE and loss recovered with each SAE's reconstruction spliced into the LLM; with --quality,
    the judge-free quality figures already computed for them, in a table of their own.

    Example: routesae eval --sae runs/topk-k64 runs/route-k64 --cache store.zarr --splice --json report.json"""
    paths = sae_paths(saes, more_saes)
    quality = None
    if quality_paths:  # read before any work: a wrong path fails in a second, not after the splice
        from routesae.quality.results import load_quality

        quality = load_quality(list(quality_paths))
    from routesae.evaluate.run import EvalConfig, run_eval

    cfg = EvalConfig(
        saes=paths, cache=cache, splice=splice, all_tokens=all_tokens,
        tokens=parse_count(tokens, "--tokens") if tokens is not None else None, baselines=_baselines(baselines),
        batch_size=batch_size, model=model, device=device, prefix=prefix, seed=seed, progress=not quiet,
    )
    report = run_eval(cfg)
    if quality is not None:
        add_quality(report, quality)
    click.echo(report.markdown())
    written = []
    if out:
        folder = Path(out)
        report.write_markdown(folder / "report.md")
        report.write_json(folder / "report.json")
        report.write_csv(folder / "report.csv")
        written += [folder / "report.md", folder / "report.json", folder / "report.csv"]
        if report.per_context is not None:
            from routesae.evaluate.per_context import write_per_context

            written.append(write_per_context(folder / "per_context.npz", report.per_context))
        written += report.plot(folder if plots is None else plots)
    if json_path:
        report.write_json(json_path)
        written.append(Path(json_path))
    if csv_path:
        report.write_csv(csv_path)
        written.append(Path(csv_path))
    if plots and not out:
        written += report.plot(plots)
    if written:
        click.echo("wrote " + ", ".join(str(p) for p in written))


OWN_ROUTINGS = ("router", "-", "mean")
"""Rows that stand for an SAE itself: quality figures belong to them, not to routing baselines or
one layer of a multi-layer SAE."""


def add_quality(report: "Report", quality: "QualityResults") -> None:
    """Fill report.quality (and its notes) from the quality outputs read; one warning line per
    --quality path whose SAEs match none evaluated, and per SAE given twice."""
    from routesae.quality.results import table_notes, table_row

    used = []
    for row in report.rows:
        if row.routing not in OWN_ROUTINGS:
            continue
        figures = quality.figures(row.path, row.layer_of or row.name)
        if figures is not None:
            report.quality.append(table_row(row.name, figures))
            used.append(figures)
    report.notes.extend(table_notes(used))
    own = [(r.path, r.layer_of or r.name) for r in report.rows if r.routing in OWN_ROUTINGS]
    for line in quality.warnings + quality.unmatched(own, "among those evaluated"):
        click.echo(f"routesae: warning: {line}", err=True)
