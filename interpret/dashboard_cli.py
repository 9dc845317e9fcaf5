"""`routesae dashboard`: static HTML pages of an SAE's latents from its contexts folder."""

from __future__ import annotations

import click


@click.command("dashboard")
@click.option("--contexts", "contexts_dir", required=True, help="A contexts folder (one SAE's) from routesae contexts.")
@click.option("--out", required=True, help="Output folder: index.html and latents/<i>.html.")
@click.option("--interp", default=None, help="interp.json from routesae interpret on the same contexts folder.")
@click.option("--latents", default=None,
              help="The first N latents (500, 1k) or a selection (3,17,40-49; one latent: 17,). Default: all.")
@click.option("--no-unembed", is_flag=True, help="Skip the decoder direction's top and bottom tokens (the model's output embedding is not read).")
@click.option("--model", default=None, help="Load the unembedding from here instead of the SAE's recorded model id.")
@click.option("--sae", default=None,
              help="The SAE folder, when the path contexts.json records is not reachable from here.")
@click.option("--quality", "quality", multiple=True, metavar="PATH",
              help="Output folder or JSON of routesae probe or absorption for this SAE (repeatable): each latent's "
                   "page lists the probing datasets it serves and its absorption partners; the index gets a column "
                   "of each.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def dashboard(contexts_dir, out, interp, latents, no_unembed, model, sae, quality, quiet) -> None:
    """An index of latents (sortable by frequency, count, max activation, judge score, layer) and a page
    per latent: top and quantile contexts shaded by activation, histogram, layer distribution, the decoder
    direction's top and bottom tokens, the judge's verdict, and with --quality the probing datasets
    and absorption partners. Static HTML that opens offline.

    Example: routesae dashboard --contexts ctx/routesae-k64 --interp interp.json --out dash"""
    from routesae.interpret.dashboard import DashboardConfig, run_dashboard

    cfg = DashboardConfig(contexts=contexts_dir, out=out, interp=interp, latents=latents, unembed=not no_unembed,
                          model=model, sae=sae, quality=list(quality), progress=not quiet)
    r = run_dashboard(cfg)
    for line in r.warnings:
        click.echo(f"routesae: warning: {line}", err=True)
    click.echo(f"wrote {r.pages} latent pages ({r.live} live, {r.dead} dead) and {r.out / 'index.html'} "
               f"in {r.seconds:.1f} s")
