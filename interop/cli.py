"""`routesae import` and `routesae export`: SAEs from other toolkits in, routesae SAEs out."""

from __future__ import annotations

import click

from routesae.interop.choices import EXPORT_FORMATS, IMPORT_FORMATS


@click.command("import")
@click.argument("path", type=click.Path())
@click.option("--format", "fmt", required=True, type=click.Choice(IMPORT_FORMATS),
              help="goodfire (.pt/.pth state dict), saelens (cfg.json + sae_weights.safetensors), sparsify (a layers.N "
              "folder), gemmascope (params.npz / params.safetensors).")
@click.option("--out", required=True, type=click.Path(), help="The routesae SAE folder to write (new or empty).")
@click.option("--layer", default=None, type=int, help="hidden_states index the SAE reads (the output of block N is N + 1); "
              "needed where the files name none, checked where they do.")
@click.option("--model", default=None, help="The model, as routesae names it (hub id, local folder, .gguf, smollm2), "
              "recorded with the SAE.")
@click.option("--store", default=None, type=click.Path(), help="A store harvested from that model: its model record is "
              "copied (eval and contexts then accept the SAE on it) and width and layer are checked against it.")
@click.option("--scale", default=None, type=float, help="Factor the SAE's inputs were multiplied by (SAELens "
              "expected_average_only_in's norm scaling factor); becomes the 'dataset' normalization.")
def import_command(path: str, fmt: str, out: str, layer: int | None, model: str | None, store: str | None,
                   scale: float | None) -> None:
    """Write another toolkit's SAE at PATH as a routesae SAE folder (see docs/formats-interop.md)."""
    from routesae.interop.importer import describe, import_sae

    result = import_sae(path, fmt, out, layer=layer, model=model, store=store, scale=scale)
    for line in describe(result):
        click.echo(line)


@click.command("export")
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", required=True, type=click.Choice(EXPORT_FORMATS),
              help="saelens (SAE.load_from_disk) or sparsify (SparseCoder.load_from_disk).")
@click.option("--out", required=True, type=click.Path(), help="Folder to write (new or empty).")
@click.option("--layer", default=None, type=int, help="RouteSAE / MLSAE: the routed layer (hidden_states index) to "
              "export the shared SAE for.")
def export(run: str, fmt: str, out: str, layer: int | None) -> None:
    """Write the routesae SAE folder RUN in another toolkit's format (see docs/formats-interop.md)."""
    from routesae.interop.export import export_sae

    result = export_sae(run, fmt, out, layer=layer)
    click.echo(f"exported {run} (hidden_states[{result.layer}]) as {fmt} -> {result.out}")
    for note in result.notes:
        click.echo(f"  note: {note}")
