"""End to end on a small store from the real offline SmolLM2-135M: fit TopK and RouteSAE with the
command line, load them back, and check what they compute against the store."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from routesae import Cache
from routesae.cli import main
from routesae.train.load import load_sae
from routesae.train.normalize import normalize


def test_fit_topk_and_routesae_on_smollm2_store(smollm2_store, tmp_path):
    out = tmp_path / "runs"
    r = CliRunner().invoke(main, ["fit", "--cache", str(smollm2_store), "--out", str(out), "--arch", "topk,routesae",
                                  "--k", "16", "--expansion", "2", "--batch-size", "256", "--epochs", "2",
                                  "--log-every", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    cache = Cache.open(smollm2_store)
    topk, route = load_sae(out / "topk-k16"), load_sae(out / "routesae-k16")
    assert topk.config.layers == [22] and route.config.layers == list(range(7, 23))
    assert topk.config.n_latents == 1152 and topk.config.model["n_layers"] == 30
    assert route.config.cache_fingerprint == cache.fingerprint

    for name in ("topk-k16", "routesae-k16"):
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["nmse"] < 0.9 * rows[0]["nmse"], name  # it learned something

    # held-out tokens (never trained on), special tokens left out as in training
    start, stop = topk.training_info["eval_range"]
    assert stop == cache.n_tokens and start < stop
    keep = ~cache.special(start, stop)
    x = cache.acts(22, start, stop)[keep]
    x_hat = topk.reconstruct(x)
    # an independent NormMSE in the normalized space: reconstruction error over energy
    xn, mean, std = normalize(x)
    nmse = (((x_hat - mean) / std - xn).pow(2).sum(-1) / xn.pow(2).sum(-1)).mean()
    assert nmse < 0.8, nmse
    # the BOS norm (~27,000 in SmolLM2) never entered training: held-out non-special tokens reconstruct fine
    assert torch.isfinite(x_hat).all()

    xl = torch.stack([cache.acts(layer, start, stop)[keep] for layer in route.config.layers], dim=1)
    rec = route.reconstruct(xl)
    rows = torch.arange(xl.shape[0])
    routed = xl[rows, rec.layer_index]
    rn, rmean, rstd = normalize(routed)
    nmse_route = (((rec.x_hat - rmean) / rstd - rn).pow(2).sum(-1) / rn.pow(2).sum(-1)).mean()
    assert nmse_route < 0.9, nmse_route
    assert ((rec.weight > 1 / 16) & (rec.weight <= 1)).all()
