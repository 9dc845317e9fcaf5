"""Training recovers a planted sparse dictionary (through the store, loader and trainer)."""

from __future__ import annotations

import numpy as np

from routesae.train.config import FitConfig
from routesae.train.load import load_sae
from routesae.train.trainer import fit
from synthetic_store import make_store, planted_dictionary


def best_cosines(planted: np.ndarray, decoder: np.ndarray) -> np.ndarray:
    """For each planted direction, its highest cosine similarity with a learned decoder row."""
    learned = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    return (planted @ learned.T).max(1)


def test_topk_and_routesae_recover_a_planted_dictionary(tmp_path):
    d_model, n_features, k = 32, 64, 3
    planted, acts_fn = planted_dictionary(d_model, n_features, k, seed=0)
    store = tmp_path / "planted.zarr"
    make_store(store, 32768, d_model=d_model, layers=[2, 3, 4], n_model_layers=8, context_len=64,
               chunk_contexts=4, shard_chunks=4, acts_fn=acts_fn)
    out = tmp_path / "run"
    fit(FitConfig(cache=str(store), out=str(out), archs=["topk", "routesae"], ks=[k], latents=128, layer=4,
                  routed_layers=[2, 3, 4], batch_size=256, lr=3e-3, epochs=4, eval_tokens=0, progress=False))
    for name in ("topk-k3", "routesae-k3"):
        sae = load_sae(out / name)
        cos = best_cosines(planted, sae.coder.W_dec.detach().numpy())
        assert cos.mean() >= 0.9, (name, cos.mean())
    # a random dictionary of the same size is far from it: the bar is meaningful
    rand = np.random.default_rng(1).standard_normal((128, d_model))
    assert best_cosines(planted, rand).mean() < 0.6
