"""Steering (interpret/steering.py, model/residual.py, `routesae steer`) on tiny random Llama and
GPT-2 models, checked against hooks and hidden states taken here independently, and once end to end
on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from routesae.cli import main
from routesae.errors import RouteSAEError
from routesae.interpret.steering import Edit, code_change, steering
from routesae.model.loading import decoder_layers
from routesae.train.config import SAEConfig
from routesae.train.normalize import apply_normalization
from routesae.train.saes import build_sae
from tiny_models import save_tiny, tiny_model

D, N_LATENTS, K = 64, 128, 8
PROMPT = [1, 17, 99, 230, 41, 7, 300, 12]
NEW = 6
# arch -> hidden_states indices it reads
LAYERS = {"topk": [2], "routesae": [1, 2, 3], "mlsae": [1, 3]}


def _model(kind: str) -> torch.nn.Module:
    return tiny_model(kind).float().requires_grad_(False)


def _sae(arch: str, normalization: str = "token", d: int = D, layers=None, seed: int = 0):
    layers = layers or LAYERS[arch]
    scale = [0.5 + 0.25 * i for i in range(len(layers))] if normalization == "dataset" else None
    cfg = SAEConfig(arch=arch, d_model=d, n_latents=N_LATENTS, k=K, layers=layers, normalization=normalization,
                    dataset_scale=scale)
    return build_sae(cfg, torch.Generator().manual_seed(seed)).eval()


def _ids() -> torch.Tensor:
    return torch.tensor([PROMPT])


def _generate(model, ids, use_cache=True, new=NEW):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0, use_cache=use_cache, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def _hidden(model, ids) -> tuple:
    with torch.no_grad():
        return model(ids, output_hidden_states=True, use_cache=False).hidden_states


def _codes(sae, hs) -> list[tuple[int, torch.Tensor]]:
    """(layer, z [seq, n_latents]) the SAE reads in an unedited forward, per layer it may edit."""
    if sae.config.arch == "routesae":
        # as reconstruct_at (and eval's splice) reads it, p * x_norm of the routed layer, and as the
        # edit batches it, the positions routed to one layer together (a matmul's last bits depend on
        # its row count)
        x = torch.stack([hs[layer][0] for layer in sae.config.layers], dim=1)
        route = sae.route(x)
        z = torch.zeros(x.shape[0], sae.config.n_latents)
        for i in range(len(sae.config.layers)):
            rows = route.layer_index == i
            if rows.any():
                inp = route.weight[rows][:, None] * apply_normalization(x[rows, i], "token")[0]
                z[rows] = sae.coder.encode(inp).detach()
        return [(-1, z)]
    if sae.config.arch == "mlsae":
        return [(layer, sae.at_layer(layer).encode(hs[layer][0])) for layer in sae.config.layers]
    return [(sae.config.layers[0], sae.encode(hs[sae.config.layers[0]][0]))]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("arch", ["topk", "routesae", "mlsae"])
def test_no_op_edits_leave_logits_and_generated_tokens_bit_identical(kind, arch):
    model, sae = _model(kind), _sae(arch)
    ids = _ids()
    hs = _hidden(model, ids)
    # a latent that fires at exactly one (position, layer) of the prompt, set to its own value there
    codes = _codes(sae, hs)
    stacked = torch.cat([z for _, z in codes])
    counts = (stacked > 0).sum(0)
    latent = int(torch.nonzero(counts == 1)[0])
    own = float(stacked[:, latent].max())
    edits = [Edit(latent, "set", own, where="active", positions="prompt"),
             Edit(5, "mul", 1.0), Edit(6, "add", 0.0), Edit(latent, "add", 0.0, where="active")]
    with torch.no_grad():
        clean_logits = model(ids, use_cache=False).logits
    clean_seq, clean_steps = _generate(model, ids)
    with steering(model, sae, edits) as st:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        seq, steps = _generate(model, ids)
    assert torch.equal(logits, clean_logits)
    assert torch.equal(seq, clean_seq) and torch.equal(steps, clean_steps)
    # the hooks ran on every forward (1 plain + prefill + NEW - 1 cached steps) and changed nothing
    assert len(st.records) == 2 + NEW - 1 and all(r.edited == 0 for r in st.records)
    # and the edit is live: another value at that position does change the logits
    with steering(model, sae, [Edit(latent, "set", own + 5.0, where="active")]) as st2:
        with torch.no_grad():
            assert not torch.equal(model(ids, use_cache=False).logits, clean_logits)
    # (MLSAE: the edited layer-1 code can make the latent fire at layer 3 too, edited there as well)
    assert st2.records[0].edited == 1 or (arch == "mlsae" and st2.records[0].edited >= 1)


class _Taps:
    """Hooks on the block before each layer keeping that layer's state of the last forward; registered
    before steering they see it unedited, after, edited."""

    def __init__(self, model, layers):
        self.states: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self.handles = [blocks[layer - 1].register_forward_hook(self._keep(layer)) for layer in layers]

    def _keep(self, layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            self.states[layer] = h.detach().clone()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("normalization", ["token", "dataset", "none"])
def test_single_layer_residual_change_is_the_latents_direction_in_model_space(kind, normalization):
    model, sae = _model(kind), _sae("topk", normalization)
    layer, latent, value = 2, 11, 7.5
    ids = _ids()
    before = _Taps(model, [layer])
    with steering(model, sae, [Edit(latent, "set", value)]):
        after = _Taps(model, [layer])
        with torch.no_grad():
            model(ids, use_cache=False)
    before.remove(), after.remove()
    x = before.states[layer][0]  # the live state the edit read
    z = sae.encode(x)[:, latent]
    _, _, std = apply_normalization(x, normalization, sae.dataset_scale[0])  # token: the token's own std
    want = (value - z)[:, None] * sae.coder.W_dec[latent].detach()[None] * std
    torch.testing.assert_close(after.states[layer][0] - x, want, rtol=1e-4, atol=1e-5)
    if normalization == "token":  # the std really is the token's
        torch.testing.assert_close(std[:, 0], x.std(-1, unbiased=False) + 1e-6, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_routesae_edits_each_position_at_its_routed_layer(kind):
    model, sae = _model(kind), _sae("routesae")
    layers, latent, value = sae.config.layers, 3, 4.0
    with torch.no_grad():  # a router that spreads these tokens over the layers
        sae.router.weight.copy_(torch.randn(sae.router.weight.shape, generator=torch.Generator().manual_seed(3)))
    ids = _ids()
    hs = _hidden(model, ids)
    route = sae.route(torch.stack([hs[layer][0] for layer in layers], dim=1))
    assert len(set(route.layer_index.tolist())) > 1
    before = _Taps(model, layers)
    with steering(model, sae, [Edit(latent, "set", value)]):
        after = _Taps(model, layers)
        with torch.no_grad():
            model(ids, use_cache=False)
    before.remove(), after.remove()
    for i, layer in enumerate(layers):
        x, y = before.states[layer][0], after.states[layer][0]
        here = route.layer_index == i
        assert torch.equal(x[~here], y[~here])  # other positions are not edited at this layer
        if not here.any():
            continue
        p = route.weight[here][:, None]
        x_norm, _, std = apply_normalization(x[here], "token")
        z = sae.coder.encode(p * x_norm)[:, latent].detach()
        want = (value - z)[:, None] * sae.coder.W_dec[latent].detach()[None] * std / p
        torch.testing.assert_close(y[here] - x[here], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("arch", ["topk", "routesae", "mlsae"])
def test_generated_tokens_are_edited_on_every_cached_one_token_step(kind, arch):
    model, sae = _model(kind), _sae(arch)
    ids = _ids()
    per_position = len(LAYERS[arch]) if arch == "mlsae" else 1
    calls: list[int] = []
    counter = decoder_layers(model)[-1].register_forward_hook(
        lambda m, a, o: calls.append((o[0] if isinstance(o, tuple) else o).shape[1]))
    try:
        for positions, prefill, step in (("all", len(PROMPT), 1), ("generated", 0, 1), ("prompt", len(PROMPT), 0)):
            calls.clear()
            with steering(model, sae, [Edit(9, "set", 30.0, positions=positions)]) as st:
                _generate(model, ids)
            # the last block ran once per forward, one token at a time after the prefill
            assert calls == [len(PROMPT)] + [1] * (NEW - 1)
            steps = [(len(PROMPT) + t, 1) for t in range(NEW - 1)]
            assert [(r.start, r.length) for r in st.records] == [(0, len(PROMPT))] + steps
            assert st.records[0].edited == prefill * per_position
            assert [r.edited for r in st.records[1:]] == [step * per_position] * (NEW - 1)
    finally:
        counter.remove()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("arch", ["topk", "routesae", "mlsae"])
def test_greedy_steered_output_is_the_same_with_and_without_the_kv_cache(kind, arch):
    model, sae = _model(kind), _sae(arch)
    ids = _ids()
    clean, _ = _generate(model, ids)
    for positions in ("all", "generated"):
        with steering(model, sae, [Edit(9, "set", 30.0, positions=positions), Edit(20, "zero")]):
            cached, _ = _generate(model, ids, use_cache=True)
            uncached, _ = _generate(model, ids, use_cache=False)
        assert torch.equal(cached, uncached)
        assert not torch.equal(cached, clean)  # the edit does something


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_routesae_routes_generated_tokens_from_a_clean_pass_over_the_routed_layers(kind):
    """The routing used at each cached step is the router's on the unedited model's routed layers of
    the text generated so far, not of all layers, and not of the edited stream."""
    model, sae = _model(kind), _sae("routesae")
    with torch.no_grad():
        sae.router.weight.copy_(torch.randn(sae.router.weight.shape, generator=torch.Generator().manual_seed(3)))
    seen = []
    route = sae.route
    sae.route = lambda x: seen.append(route(x)) or seen[-1]
    with steering(model, sae, [Edit(9, "set", 30.0)]) as st:
        seq, _ = _generate(model, _ids())
    del sae.route
    assert st.clean_pass is not None and st.clean_pass.deepest == max(LAYERS["routesae"])
    probs = torch.cat([r.probs[0] for r in seen])  # one per forward, in order of positions
    hs = _hidden(model, seq[:, :-1])  # a clean forward over the steered text
    want = sae.route(torch.stack([hs[layer][0] for layer in sae.config.layers], dim=1)).probs
    torch.testing.assert_close(probs, want, rtol=1e-4, atol=1e-5)


def test_code_change_modes_and_where():
    z = torch.tensor([[0.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
    in_prompt = torch.tensor([True, True, False])
    cols, dz = code_change(z, [Edit(0, "set", 5.0, where="active")], in_prompt)
    assert cols == [0] and dz[:, 0].tolist() == [0.0, 2.0, 4.0]
    _, dz = code_change(z, [Edit(1, "mul", 3.0, positions="generated")], in_prompt)
    assert dz[:, 0].tolist() == [0.0, 0.0, 2.0]
    _, dz = code_change(z, [Edit(0, "zero"), Edit(1, "add", 1.0, positions="prompt")], in_prompt)
    assert dz.tolist() == [[0.0, 1.0], [-3.0, 1.0], [-1.0, 0.0]]
    _, dz = code_change(z, [Edit(0, "set", 2.0), Edit(0, "add", 1.0)], in_prompt)  # compose in order
    assert dz[:, 0].tolist() == [3.0, 0.0, 2.0]


def test_bad_edits_and_architectures_are_refused():
    model = _model("llama")
    for edit, msg in ((Edit(N_LATENTS, "set", 1.0), "out of range"), (Edit(-1, "set", 1.0), "out of range"),
                      (Edit(0, "set", float("nan")), "not a finite number"), (Edit(0, "clamp", 1.0), "unknown mode"),
                      (Edit(0, "set", 1.0, where="some"), "unknown where")):
        with pytest.raises(RouteSAEError, match=msg):
            steering(model, _sae("topk"), [edit])
    with pytest.raises(RouteSAEError, match="crosscoder is not supported"):
        steering(model, _sae("crosscoder", layers=[1, 2]), [Edit(0, "set", 1.0)])
    soft = build_sae(SAEConfig(arch="routesae", d_model=D, n_latents=N_LATENTS, k=K, layers=[1, 2], routing="soft"))
    with pytest.raises(RouteSAEError, match="soft-routed"):
        steering(model, soft, [Edit(0, "set", 1.0)])
    with pytest.raises(RouteSAEError, match="after the final norm"):
        steering(model, _sae("topk", layers=[4]), [Edit(0, "set", 1.0)])
    with pytest.raises(RouteSAEError, match="d_model"):
        steering(model, _sae("topk", d=32), [Edit(0, "set", 1.0)])


def test_routesae_refuses_beam_search():
    model, sae = _model("llama"), _sae("routesae")
    ids = _ids()
    with steering(model, sae, [Edit(9, "set", 30.0)]), pytest.raises(RouteSAEError, match="beam search"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, num_beams=2, do_sample=False,
                       pad_token_id=0)


def test_steering_leaves_the_model_as_it_found_it():
    model, sae = _model("llama"), _sae("topk")
    hooks = lambda: sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in model.modules())  # noqa: E731
    n = hooks()
    with steering(model, sae, [Edit(9, "set", 30.0)]):
        assert "generate" in model.__dict__ and hooks() > n
    assert "generate" not in model.__dict__ and hooks() == n


# --- the command ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    """A tiny Llama folder and a random TopK SAE on its layer 2 that records it as its model."""
    from routesae.model.loading import load_model

    root = tmp_path_factory.mktemp("steer")
    model_dir = save_tiny("llama", root / "model")
    info = load_model(str(model_dir), "float32", "cpu").info
    return _save_sae(root / "sae", _sae("topk"), info)


def _save_sae(folder: Path, sae, model_info) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sae.export_tensors().items()}, str(folder / "sae.safetensors"))
    cfg = {**sae.config.to_dict(), "model": model_info, "training": {}}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _steer(*args):
    return CliRunner().invoke(main, ["steer", *map(str, args)])


def test_the_command_prints_both_continuations_and_the_first_steps_kl(sae_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "the cat sat on"}) + "\n\n" + json.dumps({"text": "once upon"}) + "\n")
    r = _steer("--sae", sae_dir, "--latent", 9, "--latent", 20, "--mode", "set", "--mode", "zero", "--value", 30,
               "--value", 0, "--prompts", prompts, "--max-new-tokens", 5, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [e["mode"] for e in out["edits"]] == ["set", "zero"] and len(out["results"]) == 2
    for res in out["results"]:
        assert len(res["steered"]["token_ids"]) == len(res["baseline"]["token_ids"]) == 5
        assert res["baseline"]["token_ids"] != res["steered"]["token_ids"]
        first = res["first_step"]
        assert first["kind"] == "prefill" and first["positions"] == list(range(len(res["prompt_ids"])))
        assert len(first["kl"]) == len(first["positions"]) and all(v >= 0 for v in first["kl"]) and max(first["kl"]) > 0
        assert res["forwards"] == 5 and res["cached_steps"] == res["edited_cached_steps"] == 4
    text = _steer("--sae", sae_dir, "--latent", 9, "--value", 30, "--prompt", "the cat sat on", "--max-new-tokens", 3,
                  "--device", "cpu")
    assert text.exit_code == 0, text.output
    assert "baseline" in text.output and "steered" in text.output and "first steered step (prefill" in text.output
    assert "3 of 3 forwards (2 of 2 cached one-token steps)" in text.output


@pytest.mark.parametrize("args, message", [
    (["--latent", N_LATENTS, "--value", 1, "--prompt", "hi"], f"latent {N_LATENTS} out of range"),
    (["--latent", 3, "--value", "lots", "--prompt", "hi"], "value 'lots' is not a number"),
    (["--latent", 3, "--value", "inf", "--prompt", "hi"], "is not a finite number"),
    (["--latent", "x", "--value", 1, "--prompt", "hi"], "latent 'x' is not an integer"),
    (["--latent", 3, "--value", 1], "no prompt given"),
    (["--latent", 3, "--value", 1, "--prompt", ""], "prompt 1 is empty"),
    (["--latent", 3, "--value", 1, "--prompt", "hi", "--mode", "clamp"], "unknown --mode"),
    (["--latent", 3, "--latent", 4, "--mode", "set", "--mode", "add", "--mode", "mul", "--value", 1, "--prompt", "hi"],
     "3 --mode values for 2 latents"),
    (["--latent", 3, "--mode", "add", "--prompt", "hi"], "--mode add needs a --value"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(sae_dir, args, message):
    r = _steer("--sae", sae_dir, *args, "--device", "cpu")
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("routesae: error: ") and message in r.output, r.output


def test_an_empty_prompts_file_and_an_unloadable_model_are_one_line_errors(sae_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    r = _steer("--sae", sae_dir, "--latent", 3, "--value", 1, "--prompts", empty)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "no prompt given" in r.output
    cfg = json.loads((sae_dir / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sae.safetensors").write_bytes((sae_dir / "sae.safetensors").read_bytes())
    (broken / "config.json").write_text(json.dumps({**cfg, "model": {**cfg["model"], "id": str(tmp_path / "gone")}}))
    r = _steer("--sae", broken, "--latent", 3, "--value", 1, "--prompt", "hi", "--device", "cpu")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("routesae: error: "), r.output
    assert "gone" in r.output


# --- the real model ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_bf16_no_op_is_bit_identical_and_a_set_steers_every_step(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok("The weather today is", return_tensors="pt").input_ids
    for sae in (_sae("topk", d=576, layers=[22]), _sae("routesae", d=576, layers=[10, 14, 18])):
        hs = _hidden(model, ids)
        z = _codes(sae, hs)[0][1]
        latent = int(torch.nonzero((z > 0).sum(0) == 1)[0])
        own = float(z[:, latent].max())
        clean_seq, clean_steps = _generate(model, ids, new=8)
        with steering(model, sae, [Edit(latent, "set", own, where="active"), Edit(7, "mul", 1.0)]) as st:
            seq, steps = _generate(model, ids, new=8)
        assert torch.equal(seq, clean_seq) and torch.equal(steps, clean_steps)  # bf16, bit for bit
        assert all(r.edited == 0 for r in st.records)
        with steering(model, sae, [Edit(latent, "set", 200.0)]) as st:
            seq, _ = _generate(model, ids, new=8)
        assert not torch.equal(seq, clean_seq)
        assert [r.edited for r in st.records] == [ids.shape[1]] + [1] * 7
