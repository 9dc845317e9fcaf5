"""fit end to end on synthetic stores: outputs, determinism, several SAEs from one read, loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from routesae.train.config import FitConfig
from routesae.train.data import ChunkLoader, TokenSplit
from routesae.train.load import load_sae
from routesae.train.saes.route import RoutedReconstruction
from routesae.train.trainer import fit
from synthetic_store import make_store

D = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "s.zarr"
    make_store(path, 4096, d_model=D, layers=list(range(9)), n_model_layers=8, chunk_contexts=8)
    return path


def cfg(store, out, **kw) -> FitConfig:
    base = dict(cache=str(store), out=str(out), archs=["topk", "routesae"], ks=[4, 8], latents=64, batch_size=128,
                buffer_tokens=512, progress=False, log_every=5)
    return FitConfig(**{**base, **kw})


def weights(folder):
    return load_file(str(folder / "sae.safetensors"))


def test_outputs_names_shapes_and_config(store, tmp_path):
    result = fit(cfg(store, tmp_path / "r"))
    assert [p.name for p in result.outputs] == ["topk-k4", "topk-k8", "routesae-k4", "routesae-k8"]
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
    w = weights(tmp_path / "r" / "routesae-k8")
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "W_enc": (D, 64), "b_enc": (64,), "W_dec": (64, D), "b_dec": (D,), "router.weight": (5, D)}
    torch.testing.assert_close(w["W_dec"].norm(dim=1), torch.ones(64))
    assert "router.weight" not in weights(tmp_path / "r" / "topk-k4")

    conf = json.loads((tmp_path / "r" / "routesae-k8" / "config.json").read_text())
    assert conf["arch"] == "routesae" and conf["layers"] == [2, 3, 4, 5, 6] and conf["k"] == 8
    assert conf["d_model"] == D and conf["n_latents"] == 64 and conf["normalization"] == "token"
    assert conf["model"]["id"] == "synthetic" and len(conf["cache_fingerprint"]) == 16
    split = TokenSplit.of(__import__("routesae").Cache.open(store), 0.05)
    assert conf["training"]["eval_range"] == [split.train_stop, 4096]
    epoch = ChunkLoader(__import__("routesae").Cache.open(store), [6], split, 128, 512, 0).epoch_tokens
    assert conf["training"]["tokens_seen"] == epoch == result.tokens
    assert json.loads((tmp_path / "r" / "topk-k4" / "config.json").read_text())["layers"] == [6]

    rows = [json.loads(x) for x in (tmp_path / "r" / "routesae-k4" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "nmse", "l0", "dead_frac", "tokens_per_s", "route_share", "lr", "tokens"):
        assert key in rows[0]
    assert rows[-1]["tokens"] == epoch and all(r["l0"] <= 4 for r in rows)
    assert rows[-1]["nmse"] < rows[0]["nmse"]


def test_same_seed_same_weights_and_group_equals_solo(store, tmp_path):
    short = dict(ks=[8], tokens=1600)
    fit(cfg(store, tmp_path / "a", **short))
    fit(cfg(store, tmp_path / "b", **short))
    fit(cfg(store, tmp_path / "solo", archs=["routesae"], **short))
    fit(cfg(store, tmp_path / "seed1", archs=["routesae"], seed=1, **short))
    for name in ("topk-k8", "routesae-k8"):
        wa, wb = weights(tmp_path / "a" / name), weights(tmp_path / "b" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # trained beside another SAE (on another layer), an SAE ends exactly as it would alone: the same batches
    solo, grouped = weights(tmp_path / "solo"), weights(tmp_path / "a" / "routesae-k8")
    assert all(torch.equal(solo[k], grouped[k]) for k in solo)
    other = weights(tmp_path / "seed1")
    assert not torch.equal(other["W_dec"], solo["W_dec"])


def test_every_loader_trains_the_same_weights(tmp_path):
    """The mapped loader hands batches over as float32, the others in the storage dtype: the SAEs
    must not see the difference, bit for bit (bf16 store, uncompressed, chunks of whole pages)."""
    from routesae.train.data import can_map

    path = tmp_path / "s.zarr"
    cache = make_store(path, 4096, d_model=D, layers=list(range(9)), n_model_layers=8, chunk_contexts=8,
                       storage_dtype="bfloat16", compression="none")
    assert can_map(cache, cache.layers)
    short = dict(ks=[8], tokens=1600)
    for loader in ("mapped", "process", "auto"):
        fit(cfg(path, tmp_path / loader, loader=loader, **short))
    for name in ("topk-k8", "routesae-k8"):
        ref = weights(tmp_path / "process" / name)
        for loader in ("mapped", "auto"):
            got = weights(tmp_path / loader / name)
            assert all(torch.equal(ref[k], got[k]) for k in ref), (loader, name)


def test_several_epochs_and_token_budget(store, tmp_path):
    r = fit(cfg(store, tmp_path / "e", archs=["topk"], ks=[4], epochs=2.5))
    one = fit(cfg(store, tmp_path / "one", archs=["topk"], ks=[4])).tokens
    assert r.tokens == round(2.5 * one)
    r = fit(cfg(store, tmp_path / "t", archs=["topk"], ks=[4], tokens=1000))
    assert r.tokens == 1000


def test_load_sae_api(store, tmp_path):
    fit(cfg(store, tmp_path / "r", archs=["topk", "routesae"], ks=[4], normalization="dataset"))
    topk = load_sae(tmp_path / "r" / "topk-k4")
    route = load_sae(tmp_path / "r" / "routesae-k4")
    assert not topk.training and topk.config.layers == [6] and topk.config.normalization == "dataset"
    assert topk.training_info["eval_range"][1] == 4096
    cache = __import__("routesae").Cache.open(store)
    x = cache.acts(6, 3900, 4000)
    z = topk.encode(x)
    assert z.shape == (100, 64) and ((z > 0).sum(1) <= 4).all()
    scale = topk.config.dataset_scale[0]
    torch.testing.assert_close(topk.reconstruct(x), topk.decode(z) / scale)
    # the loaded SAE computes what the trained one did: its NormMSE on held-out data is < 1
    xn = topk.coder_input(x)
    assert ((topk.decode(z) - xn).pow(2).sum(-1) / xn.pow(2).sum(-1)).mean() < 1

    xl = torch.stack([cache.acts(layer, 3900, 4000) for layer in route.config.layers], dim=1)
    rec = route.reconstruct(xl)
    assert isinstance(rec, RoutedReconstruction) and rec.x_hat.shape == (100, D)
    r = route.route(xl)
    assert torch.equal(rec.layer_index, r.layer_index) and r.probs.shape == (100, 5)
    # per token, the reconstruction is of the routed layer, in model space, p divided out
    scales = torch.tensor(route.config.dataset_scale)
    inp = r.weight[:, None] * xl[torch.arange(100), r.layer_index] * scales[r.layer_index, None]
    want = route.decode(route.encode(xl)) / r.weight[:, None] / scales[r.layer_index, None]
    torch.testing.assert_close(route.coder_input(xl), inp)
    torch.testing.assert_close(rec.x_hat, want, atol=1e-5, rtol=1e-5)


def test_auxk_trains_dead_latents_and_dead_fraction_is_logged(store, tmp_path):
    from routesae.train.saes import build_sae
    from routesae.train.trainer import _generator, plan_fit

    kw = dict(archs=["topk"], ks=[4], latents=512, dead_tokens=256, tokens=2500, log_every=2)
    fit(cfg(store, tmp_path / "off", **kw))
    fit(cfg(store, tmp_path / "on", auxk=True, **kw))
    off = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    on = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] == 0 for r in off) and max(r["dead_frac"] for r in off) > 0.05
    assert any(r["aux_loss"] > 0 for r in on)
    assert all(r["loss"] > r["nmse"] for r in on if r["aux_loss"] > 0)  # the AuxK term is in the loss

    # Without AuxK a latent that never fired never gets a gradient: its encoder row is still the
    # initial one. With AuxK, dead latents learn: those same rows move.
    plan = plan_fit(cfg(store, tmp_path / "x", **kw))
    init = build_sae(plan.sae_configs["topk-k4"], _generator(0, "topk-k4")).export_tensors()["W_enc"]
    w_off, w_on = weights(tmp_path / "off")["W_enc"], weights(tmp_path / "on")["W_enc"]
    never_fired = (w_off == init).all(0)
    assert never_fired.sum() > 0
    assert (w_on[:, never_fired] != init[:, never_fired]).any(0).float().mean() > 0.5
