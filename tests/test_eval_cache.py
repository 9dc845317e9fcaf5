"""Cache metrics (no LLM) of fitted TopK and RouteSAE SAEs, against an independent numpy
reimplementation from the saved weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routesae.evaluate.cache_eval import evaluate_cache
from routesae.sae_folders import held_out_range, load_saes
from routesae.evaluate.targets import Target
from routesae.train.config import FitConfig
from routesae.train.trainer import fit
from synthetic_store import make_store, planted_dictionary

D, CTX = 16, 16


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcache")
    _, acts_fn = planted_dictionary(D, 48, 3)
    cache = make_store(root / "s.zarr", 4096, d_model=D, n_model_layers=8, context_len=CTX, acts_fn=acts_fn)
    fit(FitConfig(cache=str(root / "s.zarr"), out=str(root / "runs"), archs=["topk", "routesae"], ks=[4],
                  latents=64, batch_size=256, eval_tokens=0.25, progress=False, seed=1))
    saes = load_saes([str(root / "runs" / "topk-k4"), str(root / "runs" / "routesae-k4")], torch.device("cpu"))
    return cache, saes


def _np_norm(x):
    mean = x.mean(-1, keepdims=True)
    std = x.std(-1, keepdims=True) + 1e-6
    return (x - mean) / std, mean, std


def _np_coder(inp, t):
    """TopK + ReLU dictionary in float64 from the exported (SAELens-oriented) weights."""
    pre = (inp - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    idx = np.argpartition(-pre, t["k"] - 1, axis=1)[:, : t["k"]]
    z = np.zeros_like(pre)
    rows = np.arange(len(pre))[:, None]
    z[rows, idx] = np.maximum(pre[rows, idx], 0)
    return z, z @ t["W_dec"] + t["b_dec"]


def _weights(sae):
    t = {k: v.double().numpy() for k, v in sae.export_tensors().items()}
    t["k"] = sae.config.k
    return t


def _fvu(x, x_hat):
    return np.var(x - x_hat, axis=0).sum() / np.var(x, axis=0).sum()


def test_cache_metrics_equal_an_independent_numpy_computation(fitted):
    cache, saes = fitted
    start, stop = held_out_range(cache, saes)
    assert start == saes[0].training["eval_range"][0] and stop == cache.n_tokens
    targets = [Target(s.name, s.sae) for s in saes]
    topk, route = evaluate_cache(cache, targets, start, stop, batch_tokens=200, progress=False)

    keep = ~cache.special(start, stop).numpy()
    n = int(keep.sum())
    assert topk.n_tokens == route.n_tokens == n

    # TopK on its one layer
    s = saes[0].sae
    x = cache.acts(s.config.layers[0], start, stop).double().numpy()[keep]
    xn, mean, std = _np_norm(x)
    z, out = _np_coder(xn, _weights(s))
    nmse = (((out - xn) ** 2).sum(-1) / (xn**2).sum(-1)).mean()
    assert topk.normmse == pytest.approx(nmse, rel=1e-4)
    assert topk.fvu == pytest.approx(_fvu(x, out * std + mean), rel=1e-4)
    assert topk.l0 == pytest.approx((z > 0).sum(-1).mean(), rel=1e-6)
    assert topk.dead_fraction == pytest.approx(((z > 0).sum(0) == 0).mean())
    assert sum(topk.firing.counts) + topk.firing.dead == s.config.n_latents
    assert topk.routing is None

    # RouteSAE: router on the sum of normalized layers, p * x_norm of the arg-max layer
    r = saes[1].sae
    xs = np.stack([cache.acts(layer, start, stop).double().numpy()[keep] for layer in r.config.layers], 1)
    xn, mean, std = _np_norm(xs)
    logits = xn.sum(1) @ r.router.weight.detach().double().numpy().T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    li = probs.argmax(-1)
    p = probs.max(-1)
    rows = np.arange(n)
    inp = p[:, None] * xn[rows, li]
    z, out = _np_coder(inp, _weights(r))
    nmse = (((out - inp) ** 2).sum(-1) / (inp**2).sum(-1)).mean()
    x_hat = out / p[:, None] * std[rows, li] + mean[rows, li]
    assert route.normmse == pytest.approx(nmse, rel=1e-4)
    assert route.fvu == pytest.approx(_fvu(xs[rows, li], x_hat), rel=1e-4)
    assert route.l0 == pytest.approx((z > 0).sum(-1).mean(), rel=1e-6)
    assert route.routing.layers == r.config.layers
    assert route.routing.tokens == np.bincount(li, minlength=len(r.config.layers)).tolist()
    np.testing.assert_allclose(route.routing.mean_weight, probs.mean(0), rtol=1e-4)
    assert sum(route.routing.fraction) == pytest.approx(1.0)


def test_baseline_routings_from_the_cache(fitted):
    cache, saes = fitted
    route = saes[1]
    start, stop = held_out_range(cache, saes)
    uni, rnd = evaluate_cache(cache, [Target("u", route.sae, "uniform"), Target("r", route.sae, "random-layer")],
                              start, stop, progress=False)
    n_layers = len(route.sae.config.layers)
    # both spread their tokens uniformly over the routed layers (uniform's tie broken at random, not
    # to the first layer), with p = 1/n for uniform and 1 for random-layer
    for baseline in (uni, rnd):
        share = np.asarray(baseline.routing.tokens) / baseline.n_tokens
        assert np.abs(share - 1 / n_layers).max() < 4 * np.sqrt(1 / n_layers / baseline.n_tokens), share
    assert uni.routing.tokens == rnd.routing.tokens  # the same draw: the two differ only in p
    np.testing.assert_allclose(uni.routing.mean_weight, 1 / n_layers, rtol=1e-6)
    np.testing.assert_allclose(rnd.routing.mean_weight, rnd.routing.fraction, rtol=1e-6)  # one-hot weights
