"""`routesae diff`."""

from __future__ import annotations

import click

from routesae.interpret.choices import REDUCTIONS
from routesae.cli_args import rerun_model_options


@click.command("diff")
@click.option("--sae", required=True, help="SAE folder.")
@click.option("--a", "set_a", required=True, help="First prompt set: a .txt (one per line), a .jsonl (a 'text' field), "
              "or builtin:novice / builtin:expert.")
@click.option("--b", "set_b", required=True, help="Second prompt set, the same kinds; line i pairs with line i of --a.")
@click.option("--reduce", type=click.Choice(list(REDUCTIONS)), default="max", show_default=True,
              help="A prompt's activation of a latent: the mean, max or last over its tokens.")
@click.option("--top", default=20, show_default=True, type=int, help="Latents listed per ranking.")
@click.option("--out", required=True, help="Folder for diff.md, diff.json and diff.png.")
@rerun_model_options
@click.option("--quiet", is_flag=True, help="No progress bars.")
def diff(sae, set_a, set_b, reduce, top, out, model, device, dtype, quiet) -> None:
    """Which latents tell two prompt sets apart: active latents per prompt, exclusive and perfectly
    separating latents, a ranking by frequency difference, paired McNemar tests. Prints a summary; the
    full tables are in diff.md, the data in diff.json, the figure in diff.png.

    Example: routesae diff --sae runs/topk-k32 --a builtin:novice --b builtin:expert --out diff"""
    from routesae.interpret.diff import DiffConfig, run_diff, summary

    result, folder = run_diff(DiffConfig(sae=sae, a=set_a, b=set_b, out=out, reduce=reduce, top=top, model=model,
                                         device=device, dtype=dtype, progress=not quiet))
    click.echo(summary(result, folder))
