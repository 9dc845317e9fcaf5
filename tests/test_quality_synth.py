"""routesae synth / synth-score: a store made from a known dictionary, read by fit and eval as any
other, and SAEs scored against the truth with known answers (the truth itself, a random
dictionary, a forced router)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file
from scipy.optimize import linear_sum_assignment

from routesae.atomic_files import write_json
from routesae.cli import _OneLineErrors
from routesae.errors import RouteSAEError
from routesae.quality import synth_cli, synth_data
from routesae.quality.synth_data import SynthConfig, make_synthetic_store
from routesae.quality.synth_score import ScoreConfig, match, run_synth_score
from routesae.store.zarr_store import Cache
from routesae.train.checkpoint import write_safetensors
from routesae.train.config import SAEConfig
from routesae.train.saes import build_sae
from routesae.train.saes.route import Routing

D, F, L = 32, 128, 4


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """4 layers, every feature in one layer, 20,480 tokens."""
    path = tmp_path_factory.mktemp("synth") / "one.zarr"
    make_synthetic_store(SynthConfig(d_model=D, n_features=F, n_layers=L, placement="one-layer", tokens=20_480), path)
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One layer, 20,480 tokens."""
    path = tmp_path_factory.mktemp("synth") / "single.zarr"
    make_synthetic_store(SynthConfig(d_model=D, n_features=F, n_layers=1, tokens=20_480, seed=3), path)
    return path


def truth_of(store):
    return load_file(str(store / "synth" / "truth.safetensors"))


def save_sae(folder, cache: Cache, arch: str, layers: list[int], W_dec: np.ndarray, k: int = 8, d_model: int = D):
    """An SAE folder of `arch` whose decoder (and encoder) rows are W_dec, tied to `cache`."""
    cfg = SAEConfig(arch=arch, d_model=d_model, n_latents=W_dec.shape[0], k=k, layers=layers, normalization="none",
                    cache_fingerprint=cache.fingerprint, model=cache.model)
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.coder.W_dec.copy_(torch.from_numpy(W_dec).float())
        sae.coder.W_enc.copy_(torch.from_numpy(W_dec).float())
    write_safetensors(folder / "sae.safetensors", sae.export_tensors())
    write_json(folder / "config.json", {**cfg.to_dict(), "training": {}})
    return folder


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_cli_placements_match_the_generator():
    assert synth_cli.PLACEMENT_CHOICES == synth_data.PLACEMENTS


def test_store_schema_and_the_formula(one_layer):
    cache = Cache.open(one_layer, require_complete=True)
    assert cache.layers == [1, 2, 3, 4] and cache.n_model_layers == 6
    assert cache.routed_layers() == cache.layers and cache.default_layer() == 4
    assert cache.model["id"] == "synthetic" and cache.model["source"] == "synthetic"
    assert cache.n_tokens == 20_480 and cache.d_model == D
    special = cache.special().numpy()
    assert (special == (np.arange(20_480) % 64 == 0)).all()
    assert (cache.token_ids().numpy()[special] == 0).all()

    t = truth_of(one_layer)
    dictionary, gain, bias = t["dictionary"], t["gain"], t["bias"]
    present = gain > 0
    np.testing.assert_allclose(np.linalg.norm(dictionary[present], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(dictionary[present].mean(1), 0, atol=1e-6)
    assert (present.sum(0) == 1).all()  # one-layer: every feature in exactly one layer
    # x_l = sum_f a_f gain[l, f] dictionary[l, f] + bias[l] + noise, recomputed from the CSR codes
    ip, feat, val = t["codes_indptr"], t["codes_feature"], t["codes_value"]
    a, b = 4096, 8192
    codes = np.zeros((b - a, F))
    for i in range(a, b):
        codes[i - a, feat[ip[i]:ip[i + 1]]] = val[ip[i]:ip[i + 1]]
    for j, layer in enumerate(cache.layers):
        expected = codes @ (gain[j][:, None] * dictionary[j]) + bias[j]
        resid = cache.acts(layer, a, b).numpy() - expected
        np.testing.assert_allclose(resid[special[a:b]], 0, atol=1e-5)  # BOS: the bias alone
        assert abs(resid[~special[a:b]].std() - 0.05) < 0.005  # the configured noise
    # each token's features all live in its source layer
    src = t["source_layer"]
    home = gain.argmax(0)
    for i in range(a, a + 500):
        assert (home[feat[ip[i]:ip[i + 1]]] == src[i]).all()
    assert (src[special] == -1).all()


def test_hierarchy_and_frequencies(one_layer):
    t = truth_of(one_layer)
    ip, feat, parent = t["codes_indptr"], t["codes_feature"], t["parent"]
    assert (parent >= 0).sum() == 4 * 6  # 128 // 32 trees of 1 + 2 + 4 features
    for i in range(0, 20_480, 7):
        active = set(feat[ip[i]:ip[i + 1]].tolist())
        for f in active:
            if parent[f] >= 0:
                assert parent[f] in active  # a child fires only with its parent
        kids = [f for f in active if parent[f] >= 0]
        assert len({parent[f] for f in kids}) == len(kids)  # siblings exclusive
    nominal = t["frequency_nominal"]
    assert nominal[0] == pytest.approx(0.4) and nominal[-1] == pytest.approx(0.01)
    assert (np.diff(nominal) <= 0).all()


def test_deterministic_and_layout_free(tmp_path):
    cfg = SynthConfig(d_model=8, n_features=32, n_layers=2, placement="mixed", tokens=5 * 1024, context_len=32)
    make_synthetic_store(cfg, tmp_path / "a")
    make_synthetic_store(cfg, tmp_path / "b")
    a, b = Cache.open(tmp_path / "a"), Cache.open(tmp_path / "b")
    for layer in a.layers:
        assert torch.equal(a.acts(layer, 0, a.n_tokens), b.acts(layer, 0, b.n_tokens))
    assert a.fingerprint == b.fingerprint
    # a block cut at any token gives the same tokens: generated per block of the seed
    s = synth_data.build_structure(cfg)
    blk = synth_data.generate_block(cfg, s, 1)
    assert np.array_equal(blk.acts[0], a.acts(a.layers[0], 4096, 5120).numpy())


def test_match_known_answers():
    truth = random_unit(20, 16, 0)
    perm = np.random.default_rng(1).permutation(20)
    assert match(-3 * truth[perm], truth).mcc == pytest.approx(1.0, abs=1e-12)
    # one row turned by 60 degrees within the plane of two orthogonal vectors
    e = np.eye(16)
    rotated = e.copy()
    rotated[0] = np.cos(np.pi / 3) * e[0] + np.sin(np.pi / 3) * e[15]
    m = match(rotated[:15], e[:15], threshold=0.9)
    assert m.mcc == pytest.approx((14 + 0.5) / 15) and m.recovered == pytest.approx(14 / 15)


def test_truth_scores_one_and_random_scores_chance(single, tmp_path):
    cache = Cache.open(single)
    t = truth_of(single)
    save_sae(tmp_path / "truth", cache, "topk", [0], t["dictionary"][0])
    save_sae(tmp_path / "random", cache, "topk", [0], random_unit(F, D, 7).astype(np.float32))
    report = run_synth_score(ScoreConfig([str(tmp_path / "truth"), str(tmp_path / "random")], str(single), all_tokens=True))
    truth_score, random_score = report.scores
    assert truth_score.mcc == pytest.approx(1.0, abs=1e-6) and truth_score.recovered == 1.0
    # chance, computed apart: Hungarian matching of two unrelated random dictionaries of this size
    chance = []
    for seed in range(3):
        cos = np.abs(random_unit(F, D, 100 + seed) @ random_unit(F, D, 200 + seed).T)
        r, c = linear_sum_assignment(-cos)
        chance.append(cos[r, c].mean())
    assert abs(random_score.mcc - np.mean(chance)) < 0.03 and random_score.mcc < 0.5
    assert random_score.recovered == 0.0
    assert truth_score.true_l0 == random_score.true_l0 > 1
    assert truth_score.l0 == pytest.approx(8, abs=0.1)


def _forced_route(cache: Cache, layers: list[int], wrong: bool):
    """A RouteSAE router that knows each token's source layer (looked up by its activations), or
    one that always picks the first layer."""
    t = truth_of(cache.path)
    stacked = torch.stack([cache.acts(layer, 0, cache.n_tokens) for layer in layers], dim=1)
    source = {stacked[i].numpy().tobytes(): int(t["source_layer"][i]) for i in range(cache.n_tokens)}

    def route(x):
        x = x.reshape(-1, len(layers), x.shape[-1])
        if wrong:
            index = torch.zeros(x.shape[0], dtype=torch.long)
        else:
            index = torch.tensor([max(source[row.numpy().tobytes()], 0) for row in x.float()])
        probs = torch.nn.functional.one_hot(index, len(layers)).float()
        return Routing(index, torch.ones(x.shape[0]), probs)

    return route


@pytest.mark.parametrize("wrong", [False, True])
def test_routing_accuracy_of_a_forced_router(one_layer, tmp_path, monkeypatch, wrong):
    from routesae.train.saes.route import RouteSAE

    cache = Cache.open(one_layer)
    t = truth_of(one_layer)
    home_dirs = t["dictionary"][t["gain"].argmax(0), np.arange(F)]
    save_sae(tmp_path / "route", cache, "routesae", cache.layers, home_dirs)
    route = _forced_route(cache, cache.layers, wrong)
    monkeypatch.setattr(RouteSAE, "route", lambda self, x: route(x))
    report = run_synth_score(ScoreConfig([str(tmp_path / "route")], str(one_layer), all_tokens=True, tokens=None))
    score = report.scores[0]
    assert score.mcc == pytest.approx(1.0, abs=1e-6) and score.recovered == 1.0
    if not wrong:
        assert score.routing_accuracy == 1.0
    else:
        # independently: the share of tokens with an active feature whose source layer is the first
        src, counts = t["source_layer"], np.diff(t["codes_indptr"])
        has = (src >= 0) & (counts > 0)
        assert score.routing_accuracy == pytest.approx((src[has] == 0).mean(), abs=1e-9)
        assert abs(score.routing_accuracy - 1 / L) < 0.03


def test_a_short_fit_recovers_features_and_eval_reads_the_store(single, tmp_path):
    from routesae.evaluate.run import EvalConfig, run_eval
    from routesae.train.config import FitConfig
    from routesae.train.trainer import fit

    fit(FitConfig(cache=str(single), out=str(tmp_path / "fit"), archs=["topk"], ks=[5], latents=F, batch_size=256,
                  epochs=16, lr=1e-2, buffer_tokens=8192, progress=False, device="cpu", dtype="float32"))
    cache = Cache.open(single)
    # the fit's own initial weights: fit seeds each SAE from (seed, its name)
    from routesae.train.trainer import _generator

    fitted_cfg = SAEConfig.from_dict(json.loads((tmp_path / "fit" / "config.json").read_text()))
    initial = build_sae(fitted_cfg, _generator(0, "topk-k5")).coder.W_dec.detach().numpy()
    save_sae(tmp_path / "init", cache, "topk", [0], initial, k=5)
    report = run_synth_score(ScoreConfig([str(tmp_path / "fit"), str(tmp_path / "init")], str(single), all_tokens=True))
    fitted, init = report.scores
    assert fitted.mcc > init.mcc + 0.25 and fitted.recovered > 0.4 and init.recovered == 0
    assert fitted.explained_variance > 0.7 > init.explained_variance
    rows = run_eval(EvalConfig(saes=[str(tmp_path / "fit")], cache=str(single), progress=False)).rows
    assert rows[0].cache.l0 == pytest.approx(5, abs=0.5)


def _cli():
    return _OneLineErrors(commands={"synth": synth_cli.synth, "synth-score": synth_cli.synth_score})


def test_cli_writes_store_and_scores(tmp_path):
    runner = CliRunner()
    r = runner.invoke(_cli(), ["synth", "--out", str(tmp_path / "s.zarr"), "--tokens", "4096", "--d-model", "16",
                               "--layers", "2", "--placement", "spanning"])
    assert r.exit_code == 0, r.output
    assert "4,096 tokens, layers [0, 1], 64 features in d_model 16 (spanning)" in r.output
    t = truth_of(tmp_path / "s.zarr")
    assert ((t["gain"] > 0).sum(0) == 2).all()  # every feature spans both layers
    assert json.loads((tmp_path / "s.zarr" / "synth" / "truth.json").read_text())["format"] == "routesae-synth-1"
    again = runner.invoke(_cli(), ["synth", "--out", str(tmp_path / "s.zarr"), "--tokens", "4096"])
    assert again.exit_code == 1 and again.output.count("\n") == 1 and "--overwrite" in again.output

    cache = Cache.open(tmp_path / "s.zarr")
    blocks = t["dictionary"].transpose(1, 0, 2).reshape(64, -1)  # a crosscoder holding the truth
    save_sae(tmp_path / "cc", cache, "crosscoder", [0, 1], blocks, d_model=16)
    r = runner.invoke(_cli(), ["synth-score", str(tmp_path / "cc"), "--cache", str(tmp_path / "s.zarr"), "--all-tokens",
                               "--out", str(tmp_path / "scores")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("cc: MCC 1.000, recovered 100.0% (|cos| >= 0.9)")
    saved = json.loads((tmp_path / "scores" / "synth_score.json").read_text())
    assert set(saved["saes"][0]["per_layer"]) == {"0", "1"}
    assert "| cc | crosscoder | 1.000 | 100.0% |" in (tmp_path / "scores" / "synth_score.md").read_text()


def test_bad_input_is_one_line(single, tmp_path):
    from synthetic_store import make_store

    make_store(tmp_path / "plain.zarr", 1024, d_model=D, layers=[0], n_model_layers=1)
    plain = Cache.open(tmp_path / "plain.zarr")
    save_sae(tmp_path / "plain-sae", plain, "topk", [0], random_unit(F, D, 0).astype(np.float32))
    runner = CliRunner()
    r = runner.invoke(_cli(), ["synth-score", str(tmp_path / "plain-sae"), "--cache", str(tmp_path / "plain.zarr"), "--all-tokens"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "is not a synthetic store" in r.output
    narrow = Cache.open(single)
    save_sae(tmp_path / "narrow", narrow, "topk", [0], random_unit(F, 16, 0).astype(np.float32), d_model=16)
    r = runner.invoke(_cli(), ["synth-score", str(tmp_path / "narrow"), "--cache", str(single), "--all-tokens"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "reads d_model 16, the store holds 32" in r.output
    with pytest.raises(RouteSAEError, match="needs at least two layers"):
        make_synthetic_store(SynthConfig(placement="spanning", n_layers=1), tmp_path / "x")


def test_help_imports_nothing_heavy():
    code = ("import sys, json; from routesae.quality import synth_cli; "
            "print(json.dumps([m for m in ('torch', 'zarr', 'scipy', 'sklearn', 'transformers') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_contexts_reads_a_synthetic_store_with_placeholder_tokens(tmp_path):
    # no tokenizer behind a synthetic store: contexts shows its placeholder ids as <tN>
    from routesae.cli import main

    store = tmp_path / "s.zarr"
    make_synthetic_store(SynthConfig(d_model=8, n_features=32, n_layers=1, tokens=4096, context_len=32), store)
    cache = Cache.open(store)
    save_sae(tmp_path / "sae", cache, "topk", [cache.layers[0]], random_unit(32, 8, 5).astype(np.float32), k=4, d_model=8)
    r = CliRunner().invoke(main, ["contexts", "--sae", str(tmp_path / "sae"), "--cache", str(store), "--all-tokens",
                                  "--out", str(tmp_path / "ctx")])
    assert r.exit_code == 0, r.output
    tokens = json.loads((tmp_path / "ctx" / "tokens.json").read_text())
    assert tokens[:3] == ["<t0>", "<t1>", "<t2>"] and len(tokens) == cache.model["vocab_size"]
    assert (tmp_path / "ctx" / "latents.jsonl").read_text().count("\n") == 32
