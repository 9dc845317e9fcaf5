"""The harvest loop: pack contexts, run the truncated forward, hand whole shards to a background
writer that writes, gathers statistics and commits. Resumable from the last committed shard."""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from routesae import __version__
from routesae.errors import RouteSAEError
from routesae.model.hooks import HiddenStateCapture, parse_layers
from routesae.harvest.corpus import DEFAULT_DATASET, document_source, shuffled
from routesae.model.loading import (
    LoadedModel,
    config_max_positions,
    config_n_layers,
    load_config,
    load_model,
    resolve_dtype,
)
from routesae.harvest.packing import PackState, pack_contexts
from routesae.model.special_tokens import SpecialTokens
from routesae.store.zarr_store import (
    ZARR_DTYPES,
    Cache,
    StatsAccumulator,
    StoreWriter,
    TORCH_DTYPES,
    _read_attrs,
    plan_layout,
)


@dataclass
class HarvestConfig:
    """Everything `routesae harvest` takes; defaults are the RouteSAE paper's."""

    out: str
    """Path of the Zarr store to write (a folder)."""
    model: str = "meta-llama/Llama-3.2-1B-Instruct"
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
    """Model dtype; activations are stored in the same dtype, so nothing is lost."""
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
    progress: bool = True
    """Show a progress bar."""


# Settings that must match for a harvest to continue an existing store.
_RESUME_KEYS = ("model.id", "model.revision", "model.dtype", "dataset", "context_len", "seed", "batch_size", "layers",
                "capacity_tokens")


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


class _Shard(NamedTuple):
    index: int
    acts: torch.Tensor  # [n_layers, n_tokens, d_model], storage dtype, CPU
    token_ids: np.ndarray
    special: np.ndarray
    tokens_after: int  # committed token count once this shard lands
    state: PackState
    stats: dict[str, Any]  # statistics over every token up to tokens_after


class _BackgroundWriter:
    """One thread that writes shards in order and commits each.

    A bounded queue gives back-pressure, so RAM holds at most three shards whatever --tokens is."""

    def __init__(self, store: StoreWriter):
        self.store = store
        self.error: BaseException | None = None
        self._queue: queue.Queue[_Shard | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="routesae-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (shard := self._queue.get()) is not None:
                self.store.write_contexts(shard.index, shard.acts, shard.token_ids, shard.special)
                self.store.commit(shard.tokens_after, shard.state.to_json(), shard.stats)
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
    out = Path(cfg.out)
    if out.exists():
        if out.is_file():
            raise RouteSAEError(f"{out} is a file, not a store folder")
        if not any(out.iterdir()):
            return None
        try:
            attrs = _read_attrs(out)
        except RouteSAEError:
            raise RouteSAEError(f"{out} exists and is not a routesae store; refusing to write there") from None
        if attrs["progress"]["complete"] and not cfg.overwrite:
            raise RouteSAEError(f"{out} is a complete store ({attrs['progress']['tokens']} tokens); pass --overwrite to replace it")
        return attrs
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RouteSAEError(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise RouteSAEError(f"cannot write {out}: {parent} is not writable")
    return None


def _provenance(cfg: HarvestConfig, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": info,
        "dataset": {"id": cfg.dataset, "split": cfg.split, "text_field": cfg.text_field, "shuffle_buffer": cfg.shuffle_buffer},
        "context_len": cfg.context_len,
        "seed": cfg.seed,
        # bf16 matmuls round differently with the batch's size: eval's clean runs can start from
        # the stored activations when its batches line up with these
        "batch_size": cfg.batch_size,
        "package_version": __version__,
    }


def run_harvest(cfg: HarvestConfig, loaded: LoadedModel | None = None) -> Cache:
    """Harvest (or continue harvesting) activations into cfg.out and return the finished store.

    `loaded` reuses a model already loaded for cfg.model, cfg.dtype (tests, benchmarks)."""
    existing = _check_output(cfg)
    documents = document_source(cfg.dataset, cfg.split, cfg.text_field)
    if cfg.tokens < cfg.context_len:
        raise RouteSAEError(f"--tokens {cfg.tokens} is less than one context of {cfg.context_len} tokens")
    if cfg.batch_size < 1:
        raise RouteSAEError("--batch-size must be at least 1")
    resolve_dtype(cfg.dtype)
    # Everything that can be checked without the weights is, before they load (many seconds):
    # the first document (a missing --text-field), then the layers and length against the config.
    if next(iter(documents()), None) is None:
        raise RouteSAEError(f"dataset {cfg.dataset!r} yields no text (no documents)")
    config = load_config(cfg.model) if loaded is None else None
    n_layers, max_positions = ((config_n_layers(config), config_max_positions(config)) if config is not None
                               else (loaded.info["n_layers"], loaded.info["max_positions"]))
    layers = parse_layers(cfg.layers, n_layers)
    if max_positions and cfg.context_len > max_positions:
        raise RouteSAEError(f"--context-len {cfg.context_len} exceeds what {cfg.model} allows ({max_positions})")
    capacity = cfg.tokens // cfg.context_len * cfg.context_len
    if capacity != cfg.tokens:
        tqdm.write(f"--tokens {cfg.tokens:,} is not a whole number of {cfg.context_len}-token contexts: harvesting "
                   f"{capacity:,} tokens ({capacity // cfg.context_len:,} contexts)", file=sys.stderr)

    if loaded is None:
        if cfg.progress:
            tqdm.write(f"loading {cfg.model} ({cfg.dtype}) ...", file=sys.stderr)
        loaded = load_model(cfg.model, cfg.dtype, cfg.device, config=config)
    info = loaded.info
    if info["n_layers"] != n_layers:
        raise RouteSAEError(f"{cfg.model}: its config says {n_layers} layers, the loaded model has {info['n_layers']}")
    storage = info["dtype"]
    itemsize = np.dtype(ZARR_DTYPES[storage]).itemsize
    provenance = _provenance(cfg, info)
    wanted = {**provenance, "layers": layers, "capacity_tokens": capacity}

    resume = existing is not None and not cfg.overwrite
    if resume:
        diff = [k for k in _RESUME_KEYS if _get(existing, k) != _get(wanted, k)]
        if diff:
            raise RouteSAEError(
                f"{cfg.out} holds an unfinished harvest with other settings ({', '.join(diff)} differ); "
                "rerun with its settings, another --out, or --overwrite"
            )
        store = StoreWriter.open(cfg.out)
        done = store.progress["tokens"]
        tqdm.write(f"resuming {cfg.out}: {done:,} of {capacity:,} tokens committed "
                   f"({done // store.layout.shard_tokens} shards), continuing from there", file=sys.stderr)
    special = SpecialTokens.of(loaded.tokenizer)
    start = PackState(**store.progress["resume"]) if resume and store.progress["resume"] else PackState()
    contexts = pack_contexts(lambda: shuffled(documents(), cfg.seed, cfg.shuffle_buffer), loaded.tokenizer, cfg.context_len, start)
    if not resume:
        # Look at the first context before creating anything, so an empty corpus leaves no store behind.
        first = next(contexts, None)
        if first is None:
            raise RouteSAEError(f"dataset {cfg.dataset!r} yields no text for one context of {cfg.context_len} tokens")
        contexts = itertools.chain([first], contexts)

    if not resume:
        if existing is not None:
            shutil.rmtree(cfg.out)
        layout = plan_layout(
            cfg.context_len, info["d_model"], len(layers), itemsize, cfg.batch_size,
            cfg.shard_tokens, min_chunk_bytes=cfg.min_chunk_bytes, compression=cfg.compression,
        )
        try:
            store = StoreWriter.create(cfg.out, provenance, layers, info["d_model"], storage, capacity, layout)
        except PermissionError:
            raise RouteSAEError(f"cannot write {cfg.out}: permission denied") from None

    _harvest_loop(cfg, store, loaded.model, layers, special, contexts)
    return Cache.open(cfg.out, require_complete=True)


def _harvest_loop(cfg, store: StoreWriter, model, layers, special: SpecialTokens, contexts) -> None:
    ctx = cfg.context_len
    shard_ctx = store.layout.shard_tokens // ctx
    target_ctx = store.attrs["capacity_tokens"] // ctx
    done_ctx = store.progress["tokens"] // ctx
    stats = StatsAccumulator(layers, store.attrs["d_model"], store.progress["stats"])
    device = next(model.parameters()).device
    storage_dtype = TORCH_DTYPES[store.attrs["storage_dtype"]]
    d_model = store.attrs["d_model"]

    writer = _BackgroundWriter(store)
    bar = tqdm(total=target_ctx * ctx, initial=done_ctx * ctx, unit="tok", unit_scale=True,
               desc="harvest", disable=not cfg.progress, dynamic_ncols=True)
    shard_index = done_ctx // shard_ctx
    buf_acts = torch.empty(len(layers), shard_ctx * ctx, d_model, dtype=storage_dtype)
    buf_ids: list[np.ndarray] = []
    state = PackState()
    try:
        with HiddenStateCapture(model, layers) as capture:
            while done_ctx < target_ctx:
                want = min(cfg.batch_size, shard_ctx - len(buf_ids), target_ctx - done_ctx)
                batch = list(itertools.islice(contexts, want))
                if batch:
                    ids = np.stack([ids for ids, _ in batch])
                    state = batch[-1][1]
                    at = len(buf_ids) * ctx
                    dest = buf_acts[:, at : at + ids.size]
                    capture(torch.from_numpy(ids).long().to(device), out=dest.view(len(layers), *ids.shape, d_model))
                    stats.add(dest, ~torch.from_numpy(special.mask(ids.reshape(-1))))
                    buf_ids.extend(ids)
                    done_ctx += len(batch)
                    bar.update(ids.size)
                exhausted = len(batch) < want
                if buf_ids and (len(buf_ids) == shard_ctx or done_ctx == target_ctx or exhausted):
                    token_ids = np.concatenate(buf_ids)
                    n = token_ids.size
                    writer.submit(_Shard(shard_index, buf_acts[:, :n], token_ids, special.mask(token_ids), done_ctx * ctx, state, stats.state()))
                    shard_index += 1
                    buf_ids = []
                    buf_acts = torch.empty_like(buf_acts)
                if exhausted:
                    bar.write(f"dataset exhausted after {done_ctx * ctx:,} tokens (asked for {target_ctx * ctx:,})")
                    break
        writer.close()
    except BaseException:
        bar.close()
        # Let the writer finish what it has (so its commit stays consistent), then report.
        try:
            writer.close()
        except BaseException:
            pass
        raise
    bar.close()
    store.finish(done_ctx * ctx, stats.state())
