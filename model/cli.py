"""`routesae export-model`: a model as a plain transformers folder, e.g. for `transformers serve`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export-model")
@click.option("--model", "spec", required=True,
              help="What to copy: 'smollm2' (the offline model), a .gguf file or a local transformers folder.")
@click.option("--out", required=True, help="The folder to write (absent or empty).")
@click.option("--dtype", default="float32", show_default=True,
              help="Dtype of the saved weights: float32 (quickest on CPU), bfloat16, float16.")
def export_model(spec: str, out: str, dtype: str) -> None:
    """Save a model (GGUF included, dequantized) as a transformers folder: safetensors, config,
    tokenizer. A finished copy of the same model already at --out is kept.

    \b
    Example: routesae export-model --model smollm2 --out models/smollm2
    then:    transformers serve models/smollm2 --host 127.0.0.1 --port 8000 --device cpu"""
    from routesae.model.local_copy import save_local_copy

    click.echo(f"wrote {save_local_copy(spec, Path(out), dtype)}")
