"""The harvest loop: pack contexts, run the truncated forward, hand whole shards to a background
writer that writes, records and commits them. Resumable from the last committed shard.

Under torchrun every rank packs the same document stream and runs the forward only for its own
shards (shard s belongs to rank s % world_size), so no shard has two writers and the store is the
one a single process writes. Rank 0 creates the store, commits the prefix all ranks have filled and
finishes it."""

from __future__ import annotations

import itertools
import os
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from routesae import __version__
from routesae.cpu_memory import keep_freed_memory
from routesae.errors import RouteSAEError
from routesae.model.compute_dtype import ComputeDtype, canonical, pick_compute_dtype
from routesae.harvest.host_staging import HostStaging
from routesae.model.hooks import HiddenStateCapture
from routesae.harvest.choices import DEFAULT_DATASET, DEFAULT_MODEL
from routesae.harvest.corpus import document_source, shuffled
from routesae.model.loading import (
    LoadedModel,
    check_layers_and_length,
    load_model,
    resolve_device,
    resolve_dtype,
)
from routesae.harvest.packing import PackState, pack_contexts
from routesae.model.special_tokens import SpecialTokens
from routesae.ranks import Ranks, current_ranks, init_process_group
from routesae.store.zarr_store import (
    ZARR_DTYPES,
    Cache,
    StatsAccumulator,
    StoreWriter,
    TORCH_DTYPES,
    STORAGES,
    _read_attrs,
    plan_layout,
    remove_store,
)
from routesae.store.int8 import dequantize, quantize
from routesae.store.location import RemotePath, StorePath, store_path


@dataclass
class HarvestConfig:
    """Everything `routesae harvest` takes; defaults are the RouteSAE paper's."""

    out: str
    """Path of the Zarr store to write (a folder)."""
    model: str = DEFAULT_MODEL
    """Hub id, local folder, .gguf file, or 'smollm2' for the offline model."""
    dataset: str = DEFAULT_DATASET
    """Hub dataset id (streamed), local .jsonl/.json/.txt/.parquet file or folder, or 'builtin'."""
    split: str = "train"
    """Dataset split (hub datasets)."""
    text_field: str = "text"
    """Field holding the text in json/jsonl/parquet/hub records."""
    tokens: int = 100_000_000
    """Tokens to harvest, rounded down to whole contexts."""
    layers: str = "middle"
    """hidden_states indices: 'middle' (L//4..3L//4), 'all', '4-12' or '4,8,12'."""
    context_len: int = 512
    """Tokens per context, BOS included."""
    batch_size: int = 8
    """Contexts per forward pass."""
    dtype: str = "bfloat16"
    """Storage dtype of the activations (and the model's dtype where the device runs it natively)."""
    compute_dtype: str = "auto"
    """The forward's dtype: 'auto' (`dtype` where the device multiplies it natively, else float32,
    rounded to `dtype` when stored: model/compute_dtype.py), or a dtype name. A resumed store keeps
    the one it recorded, so all its shards come from the same forward."""
    device: str = "auto"
    """'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ..."""
    seed: int = 0
    """Seed of the document shuffle (used when shuffle_buffer > 1)."""
    shuffle_buffer: int = 0
    """Shuffle documents within a buffer of this many (0: corpus order)."""
    overwrite: bool = False
    """Replace an existing store at `out`."""
    shard_tokens: int | None = None
    """Tokens per shard file (default: about 128 MiB over all layers)."""
    min_chunk_bytes: int = 1 << 20
    """Smallest chunk, in bytes of one layer; chunks hold whole contexts."""
    compression: str = "none"
    """Activations: 'none', or 'blosc-zstd' (byte shuffle + zstd level 1; ~1.27x smaller, costs CPU)."""
    storage: str = "model"
    """'model' (the model's dtype, exact) or 'int8' (per-token absmax scale, special tokens exact; ~half the bytes)."""
    progress: bool = True
    """Show a progress bar."""


# Settings that must match for a harvest to continue an existing store.
_RESUME_KEYS = ("model.id", "model.revision", "model.dtype", "model.compute_dtype", "dataset", "context_len", "seed", "batch_size", "layers",
                "capacity_tokens", "layout.storage")


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


class _Shard(NamedTuple):
    index: int
    acts: torch.Tensor  # [n_layers, n_tokens, d_model], storage dtype, CPU
    token_ids: np.ndarray
    special: np.ndarray
    tokens_after: int  # token count of the store once this shard and all before it are in
    state: PackState
    stats: StatsAccumulator  # this shard's non-special tokens only
    quantized: tuple[torch.Tensor, torch.Tensor] | None  # int8 stores: (q, scales) of acts


class _BackgroundWriter:
    """One thread that writes shards in order, records each and (on the committing rank) commits.

    A bounded queue gives back-pressure, so RAM holds at most three shards whatever --tokens is."""

    def __init__(self, store: StoreWriter, commits: bool = True):
        self.store = store
        self.commits = commits
        self.error: BaseException | None = None
        self._queue: queue.Queue[_Shard | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="routesae-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (shard := self._queue.get()) is not None:
                self.store.write_contexts(shard.index, shard.acts, shard.token_ids, shard.special, shard.quantized)
                self.store.record_shard(shard.index, shard.tokens_after, shard.state.to_json(),
                                        shard.stats.count, shard.stats.packed())
                if self.commits:
                    self.store.advance()
        except BaseException as e:  # handed to the main thread, which reports it
            self.error = e

    def submit(self, shard: _Shard) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(shard, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait for every submitted shard to be committed."""
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


def _check_output(cfg: HarvestConfig) -> dict[str, Any] | None:
    """Existing store attributes when `out` is a store we may resume or replace; None when new."""
    out = store_path(cfg.out)
    if isinstance(out, RemotePath):
        return _check_remote_output(cfg, out)
    if out.exists():
        if out.is_file():
            raise RouteSAEError(f"{out} is a file, not a store folder")
        if not any(out.iterdir()):
            return None
        return _existing_store(cfg, out)
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RouteSAEError(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise RouteSAEError(f"cannot write {out}: {parent} is not writable")
    return None


def _check_remote_output(cfg: HarvestConfig, out: RemotePath) -> dict[str, Any] | None:
    try:
        exists = out.exists()
        is_object = exists and out.is_file()
    except Exception as e:  # the bucket is missing, unreachable, or the credentials are refused
        raise RouteSAEError(f"cannot reach {out}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not exists:
        return None
    if is_object:
        raise RouteSAEError(f"{out} is an object, not a store prefix")
    return _existing_store(cfg, out)


def _existing_store(cfg: HarvestConfig, out: StorePath) -> dict[str, Any]:
    try:
        attrs = _read_attrs(out)
    except RouteSAEError:
        raise RouteSAEError(f"{out} exists and is not a routesae store; refusing to write there") from None
    if attrs["progress"]["complete"] and not cfg.overwrite:
        raise RouteSAEError(f"{out} is a complete store ({attrs['progress']['tokens']} tokens); pass --overwrite to replace it")
    return attrs


def _provenance(cfg: HarvestConfig, info: dict[str, Any], storage: str) -> dict[str, Any]:
    return {
        # model.dtype: what the store holds; model.compute_dtype: what the forward ran in (repair
        # and eval's clean runs rerun it in that dtype)
        "model": {**info, "dtype": storage, "compute_dtype": info["dtype"]},
        "dataset": {"id": cfg.dataset, "split": cfg.split, "text_field": cfg.text_field, "shuffle_buffer": cfg.shuffle_buffer},
        "context_len": cfg.context_len,
        "seed": cfg.seed,
        # bf16 matmuls round differently with the batch's size: eval's clean runs can start from
        # the stored activations when its batches line up with these
        "batch_size": cfg.batch_size,
        "package_version": __version__,
    }


def _compute_dtype(cfg: HarvestConfig, existing: dict[str, Any] | None, storage: str, ranks: Ranks,
                   loaded: LoadedModel | None) -> ComputeDtype:
    """The forward's dtype: a given model's own; a resumed store's recorded one (under 'auto');
    else model/compute_dtype.py's choice for the device."""
    if loaded is not None:
        return ComputeDtype(loaded.info["dtype"], "the model given", False)
    if existing is not None and not cfg.overwrite and cfg.compute_dtype == "auto":
        model = existing.get("model", {})
        recorded = model.get("compute_dtype") or model.get("dtype")
        if recorded:
            return ComputeDtype(canonical(recorded), "as the store was begun", False)
    return pick_compute_dtype(cfg.compute_dtype, storage, resolve_device(ranks.device(cfg.device)), source="storage")


def run_harvest(cfg: HarvestConfig, loaded: LoadedModel | None = None, ranks: Ranks | None = None) -> Cache:
    """Harvest (or continue harvesting) activations into cfg.out and return the finished store.

    `loaded` reuses a model already loaded for cfg.model, cfg.dtype (tests, benchmarks); `ranks`
    defaults to what torchrun's environment says (rank 0 of 1 without it)."""
    ranks = ranks or current_ranks()
    init_process_group(ranks)
    # Every check below only reads, so each rank reaches the same verdict without talking.
    existing = _check_output(cfg)
    documents = document_source(cfg.dataset, cfg.split, cfg.text_field)
    if cfg.tokens < cfg.context_len:
        raise RouteSAEError(f"--tokens {cfg.tokens} is less than one context of {cfg.context_len} tokens")
    if cfg.batch_size < 1:
        raise RouteSAEError("--batch-size must be at least 1")
    storage, _ = resolve_dtype(cfg.dtype)
    compute = _compute_dtype(cfg, existing, storage, ranks, loaded)
    # Everything that can be checked without the weights is, before they load (many seconds):
    # the first document (a missing --text-field), then the layers and length against the config.
    if next(iter(documents()), None) is None:
        raise RouteSAEError(f"dataset {cfg.dataset!r} yields no text (no documents)")
    config, n_layers, layers = check_layers_and_length(cfg.model, loaded, cfg.layers, cfg.context_len, "--context-len")
    capacity = cfg.tokens // cfg.context_len * cfg.context_len
    if capacity != cfg.tokens and ranks.is_main:
        tqdm.write(f"--tokens {cfg.tokens:,} is not a whole number of {cfg.context_len}-token contexts: harvesting "
                   f"{capacity:,} tokens ({capacity // cfg.context_len:,} contexts)", file=sys.stderr)

    if loaded is None:
        if cfg.progress and ranks.is_main:
            how = f"({storage})" if compute.name == storage else f"in {compute.name} ({compute.reason})"
            tqdm.write(f"loading {cfg.model} {how} ...", file=sys.stderr)
        device = ranks.device(cfg.device)
        if ranks.distributed and device.startswith("cuda"):
            torch.cuda.set_device(device)  # kernels and buffers made without a device go to this rank's GPU
        loaded = load_model(cfg.model, compute.name, device, config=config)
    info = loaded.info
    if info["n_layers"] != n_layers:
        raise RouteSAEError(f"{cfg.model}: its config says {n_layers} layers, the loaded model has {info['n_layers']}")
    if cfg.storage not in STORAGES:
        raise RouteSAEError(f"--storage {cfg.storage!r}: use {' or '.join(STORAGES)}")
    itemsize = 1 if cfg.storage == "int8" else np.dtype(ZARR_DTYPES[storage]).itemsize
    provenance = _provenance(cfg, info, storage)
    wanted = {**provenance, "layers": layers, "capacity_tokens": capacity, "layout": {"storage": cfg.storage}}

    resume = existing is not None and not cfg.overwrite
    if resume:
        # older stores: no layout record (model storage), no compute dtype (the forward ran in the storage dtype)
        existing = {**existing, "layout": {"storage": "model", **existing.get("layout", {})},
                    "model": {"compute_dtype": existing.get("model", {}).get("dtype"), **existing.get("model", {})}}
        diff = [k for k in _RESUME_KEYS if _get(existing, k) != _get(wanted, k)]
        if diff:
            raise RouteSAEError(
                f"{cfg.out} holds an unfinished harvest with other settings ({', '.join(diff)} differ); "
                "rerun with its settings, another --out, or --overwrite"
            )
    special = SpecialTokens.of(loaded.tokenizer)

    def pack_from(state: PackState):
        return pack_contexts(lambda: shuffled(documents(), cfg.seed, cfg.shuffle_buffer), loaded.tokenizer,
                             cfg.context_len, state)

    # Rank 0 alone creates (or readies) the store, once every rank has looked at what was there
    # before; the others open it once rank 0 says it has.
    ranks.barrier()
    error = None
    if ranks.is_main:
        try:
            if resume:
                store = StoreWriter.open(cfg.out, owns=lambda shard: shard % ranks.world_size == 0)
            else:
                # Look at the first context before creating anything, so an empty corpus leaves no store behind.
                if next(pack_from(PackState()), None) is None:
                    raise RouteSAEError(f"dataset {cfg.dataset!r} yields no text for one context of {cfg.context_len} tokens")
                if existing is not None:
                    remove_store(cfg.out)
                layout = plan_layout(
                    cfg.context_len, info["d_model"], len(layers), itemsize, cfg.batch_size,
                    cfg.shard_tokens, min_chunk_bytes=cfg.min_chunk_bytes, compression=cfg.compression,
                    storage=cfg.storage,
                )
                try:
                    store = StoreWriter.create(cfg.out, provenance, layers, info["d_model"], storage, capacity, layout)
                except PermissionError:
                    raise RouteSAEError(f"cannot write {cfg.out}: permission denied") from None
        except RouteSAEError as e:
            error = str(e)
            ranks.share_error(error)
            raise
    ranks.share_error(error)
    if not ranks.is_main:
        store = StoreWriter.open(cfg.out, owns=lambda shard: shard % ranks.world_size == ranks.rank)
    if resume and ranks.is_main:
        done = store.progress["tokens"]
        tqdm.write(f"resuming {cfg.out}: {done:,} of {capacity:,} tokens committed "
                   f"({done // store.layout.shard_tokens} shards), continuing from there", file=sys.stderr)
    start = PackState(**store.progress["resume"]) if store.progress["resume"] else PackState()
    _harvest_loop(cfg, store, loaded.model, layers, special, pack_from(start), ranks)
    ranks.barrier()  # rank 0 has finished the store
    return Cache.open(cfg.out, require_complete=True)


def _harvest_loop(cfg, store: StoreWriter, model, layers, special: SpecialTokens, contexts, ranks: Ranks) -> None:
    ctx = cfg.context_len
    shard_ctx = store.layout.shard_tokens // ctx
    target_ctx = store.attrs["capacity_tokens"] // ctx
    first_shard = store.progress["tokens"] // ctx // shard_ctx
    n_shards = -(-target_ctx // shard_ctx)
    recorded = store.recorded_shards(first_shard)  # written whole before a kill, not yet committed
    mine = {s for s in range(first_shard, n_shards) if s % ranks.world_size == ranks.rank and s not in recorded}
    device = next(model.parameters()).device
    if device.type == "cpu":
        keep_freed_memory()  # the forward's temporaries are reused, not faulted in afresh (~5% here)
    storage_dtype = TORCH_DTYPES[store.attrs.get("value_dtype", store.attrs["storage_dtype"])]  # the model's
    d_model = store.attrs["d_model"]

    writer = _BackgroundWriter(store, commits=ranks.is_main)
    my_ctx = sum(min(shard_ctx, target_ctx - s * shard_ctx) for s in mine)
    desc = "harvest" if not ranks.distributed else f"harvest (rank 0 of {ranks.world_size})"
    if cfg.progress and ranks.is_main:
        tqdm.write(f"harvesting {my_ctx * ctx:,} tokens of layers {_layer_list(layers)} in batches of {cfg.batch_size} "
                   f"contexts of {ctx}; shards of {shard_ctx * ctx:,} tokens are committed as they fill", file=sys.stderr)
    # The bar counts tokens through the model, batch by batch; its postfix the tokens committed.
    bar = tqdm(total=my_ctx * ctx, unit="tok", unit_scale=True, desc=desc,
               disable=not cfg.progress or not ranks.is_main, dynamic_ncols=True)
    bar.set_postfix_str(f"committed={store.progress['tokens']:,}", refresh=False)
    staging = HostStaging(device)
    buf_acts = staging.host_empty((len(layers), shard_ctx * ctx, d_model), storage_dtype)
    int8 = store.layout.storage == "int8"
    end_ctx = target_ctx  # where the corpus ends, if before the capacity
    try:
        with HiddenStateCapture(model, layers) as capture:
            for shard in range(first_shard, n_shards):
                want = min(shard_ctx, target_ctx - shard * shard_ctx)
                if shard not in mine:  # another writer's (or already written): pack past it
                    got = sum(1 for _ in itertools.islice(contexts, want))
                else:
                    quant = (staging.host_empty(buf_acts.shape, torch.int8),
                             staging.host_empty(buf_acts.shape[:2], torch.float32)) if int8 else None
                    got = _forward_shard(cfg, writer, capture, contexts, shard, want, buf_acts, quant, special, staging,
                                         bar)
                    buf_acts = staging.host_empty(buf_acts.shape, buf_acts.dtype)  # the writer holds the last one
                if got < want:
                    end_ctx = shard * shard_ctx + got
                    if ranks.is_main:
                        bar.write(f"dataset exhausted after {end_ctx * ctx:,} tokens (asked for {target_ctx * ctx:,})")
                    break
        writer.close()
    except BaseException:
        bar.close()
        # Let the writer finish what it has (so its records stay consistent), then report.
        try:
            writer.close()
        except BaseException:
            pass
        raise
    bar.set_postfix_str(f"committed={store.progress['tokens']:,}", refresh=False)
    bar.close()
    ranks.barrier()  # every rank has recorded its shards
    if ranks.is_main:
        store.advance()
        if store.progress["tokens"] != end_ctx * ctx:
            raise RouteSAEError(f"{cfg.out}: {store.progress['tokens']:,} tokens committed where the corpus gives "
                                f"{end_ctx * ctx:,}: a writer's shards are missing; rerun the same command")
        store.finish(end_ctx * ctx, store.progress["stats"])


def _forward_shard(cfg, writer: _BackgroundWriter, capture: HiddenStateCapture, contexts, shard: int, want: int,
                   buf_acts: torch.Tensor, quant: tuple[torch.Tensor, torch.Tensor] | None, special: SpecialTokens,
                   staging: HostStaging, bar: tqdm) -> int:
    """Run the forward over the next `want` contexts (shard `shard`) in the harvest's batches and
    hand the shard to the writer; the number of contexts the corpus still had (0..want). The bar
    moves by each batch's tokens, its postfix saying how many are committed.

    int8 stores (`quant`: buffers for q and the scales): each batch is quantized as it comes, and
    its statistics are those of the values readers will get back (so `info --verify` agrees)."""
    ctx = cfg.context_len
    n_layers, _, d_model = buf_acts.shape
    stats = StatsAccumulator(writer.store.layers, d_model)
    ids_done: list[np.ndarray] = []
    state = PackState()
    while len(ids_done) < want:
        batch = list(itertools.islice(contexts, min(cfg.batch_size, want - len(ids_done))))
        if not batch:
            break
        ids = np.stack([ids for ids, _ in batch])
        state = batch[-1][1]
        at = len(ids_done) * ctx
        dest = buf_acts[:, at : at + ids.size]
        acts = staging.capture(capture, torch.from_numpy(ids).long(), dest)  # dest itself, or a device buffer
        is_special = torch.from_numpy(special.mask(ids.reshape(-1)))
        if quant is not None:
            _quantize_batch(acts, quant[0][:, at : at + ids.size], quant[1][:, at : at + ids.size],
                            is_special.to(acts.device), staging.pin)
        stats.add(acts, ~is_special)
        staging.to_host(acts, dest)
        ids_done.extend(ids)
        bar.set_postfix_str(f"committed={writer.store.progress['tokens']:,}", refresh=False)
        bar.update(ids.size)
        if len(batch) < cfg.batch_size and len(ids_done) < want:
            break  # the corpus ran out mid-batch
    staging.wait()  # the batches' copies have landed in buf_acts (and quant) before the writer reads them
    if ids_done:
        token_ids = np.concatenate(ids_done)
        n = token_ids.size
        tokens_after = (shard * (buf_acts.shape[1] // ctx) + len(ids_done)) * ctx
        quantized = (quant[0][:, :n], quant[1][:, :n]) if quant is not None else None
        writer.submit(_Shard(shard, buf_acts[:, :n], token_ids, special.mask(token_ids), tokens_after, state, stats,
                             quantized))
    return len(ids_done)


def _layer_list(layers: list[int]) -> str:
    """[4, 5, 6, 7, 12] -> '4-7, 12'."""
    runs: list[list[int]] = []
    for x in layers:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _quantize_batch(acts: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor, is_special: torch.Tensor,
                    non_blocking: bool = False) -> None:
    """acts [n_layers, n, d] -> q_out, scale_out (host buffers, copied into without waiting where
    non_blocking); acts then holds what an int8 reader gets back (dequantized rows, special rows
    left exact). One layer at a time bounds the float32 copy."""
    for i in range(acts.shape[0]):
        q, scale = quantize(acts[i])
        q_out[i].copy_(q, non_blocking=non_blocking)
        scale_out[i].copy_(scale, non_blocking=non_blocking)
        exact = acts[i][is_special]
        dequantize(q, scale, acts.dtype, out=acts[i])
        acts[i][is_special] = exact
