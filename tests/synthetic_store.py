"""Small activation stores for tests, written through the real StoreWriter (no LLM).

`make_store` fills a store with activations from a function of (layer position, token range), so
tests can plant structure (a sparse dictionary) or just use Gaussian noise."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from routesae.store.zarr_store import Cache, StatsAccumulator, StoreLayout, StoreWriter, ZARR_DTYPES

ActsFn = Callable[[int, int, int], np.ndarray]
"""(layer position, start, stop) -> float32 activations [stop - start, d_model]."""


def gaussian_acts(d_model: int, seed: int = 0, scale: float = 3.0) -> ActsFn:
    """Noise with a per-layer offset and scale, deterministic in (layer, token)."""

    def fn(layer_pos: int, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, d_model), dtype=np.float32)
        for t in range(start, stop):
            rng = np.random.default_rng([seed, layer_pos, t])
            out[t - start] = rng.standard_normal(d_model) * scale * (1 + 0.1 * layer_pos) + layer_pos
        return out

    return fn


def planted_dictionary(d_model: int, n_features: int, k: int, seed: int = 0) -> tuple[np.ndarray, ActsFn]:
    """A dictionary of unit rows with zero mean across d_model (so per-token normalization keeps
    them), and activations that are sums of k of them with positive coefficients, plus a small
    per-token offset along the all-ones direction. Same dictionary for every layer."""
    rng = np.random.default_rng([seed, 12345])
    dictionary = rng.standard_normal((n_features, d_model))
    dictionary -= dictionary.mean(1, keepdims=True)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)

    def fn(layer_pos: int, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([seed, layer_pos, start])
        n = stop - start
        picks = np.argsort(rng.random((n, n_features)), axis=1)[:, :k]
        coefs = rng.uniform(1.0, 3.0, size=(n, k))
        x = np.einsum("nk,nkd->nd", coefs, dictionary[picks])
        x += rng.standard_normal((n, 1)) * 0.5  # a shift the normalization removes
        return x.astype(np.float32)

    return dictionary.astype(np.float32), fn


def make_store(
    path: str | Path,
    n_tokens: int,
    d_model: int = 16,
    layers: list[int] | None = None,
    n_model_layers: int = 8,
    context_len: int = 16,
    chunk_contexts: int = 2,
    shard_chunks: int = 2,
    storage_dtype: str = "float32",
    acts_fn: ActsFn | None = None,
    bos_at_start: bool = True,
    model_id: str = "synthetic",
    finish: bool = True,
    compression: str = "blosc-zstd",
) -> Cache:
    """Write a complete store of n_tokens (a multiple of context_len) and open it.

    The first token of every context is flagged special (a BOS) when bos_at_start."""
    layers = list(range(n_model_layers + 1)) if layers is None else list(layers)
    acts_fn = acts_fn or gaussian_acts(d_model)
    assert n_tokens % context_len == 0
    layout = StoreLayout(chunk_contexts * context_len, shard_chunks * chunk_contexts * context_len, compression)
    provenance = {
        "model": {"id": model_id, "revision": None, "dtype": storage_dtype, "n_layers": n_model_layers},
        "dataset": {"id": "synthetic", "split": "train", "text_field": "text", "shuffle_buffer": 0},
        "context_len": context_len,
    }
    writer = StoreWriter.create(path, provenance, layers, d_model, storage_dtype, n_tokens, layout)
    stats = StatsAccumulator(layers, d_model)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[storage_dtype]
    for shard, start in enumerate(range(0, n_tokens, layout.shard_tokens)):
        stop = min(start + layout.shard_tokens, n_tokens)
        acts = torch.stack([torch.from_numpy(acts_fn(i, start, stop)) for i in range(len(layers))])
        stored = acts.to(torch_dtype)
        raw = stored.view(torch.uint16).numpy() if storage_dtype == "bfloat16" else stored.numpy()
        assert raw.dtype == ZARR_DTYPES[storage_dtype]
        positions = (np.arange(start, stop) % context_len).astype(np.int32)
        special = (positions == 0) if bos_at_start else np.zeros(stop - start, dtype=bool)
        token_ids = (np.arange(start, stop) % 1000).astype(np.int32)
        writer.write_shard(shard, raw, token_ids, positions, special)
        stats.add(stored.float(), torch.from_numpy(~special))
        if not finish:
            writer.commit(stop, None, stats.state())
    if finish:
        writer.finish(n_tokens, stats.state())
    return Cache.open(path)
