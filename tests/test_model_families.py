"""Every model family routesae claims, on a tiny random-weight model of each (tests/tiny_models.py):
harvest stores what transformers' `output_hidden_states` gives, the residual hooks read and write
where hidden_states[i] is read, an identity splice and a no-op steering edit change nothing, the
special tokens are flagged, and a family routesae cannot run is refused before its weights load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from routesae.cli import main
from routesae.errors import RouteSAEError
from routesae.evaluate.splice import SpliceEvaluator, SpliceModel, SplicePlan
from routesae.harvest.packing import pack_contexts
from routesae.harvest.run import HarvestConfig, run_harvest
from routesae.interpret.steering import Edit, steering
from routesae.model.hook_names import hook_names
from routesae.model.hooks import HiddenStateCapture
from routesae.model.loading import check_layers_and_length, decoder_layers, final_norm, load_config, load_model
from routesae.model.residual import ResidualEditor
from routesae.model.special_tokens import SpecialTokens
from routesae.train.config import SAEConfig
from routesae.train.saes import build_sae
from tiny_models import (FAMILIES, FAMILY_SPECIALS, FAMILY_WIDTH, SPECIAL_IDS, family_model, family_tokenizer,
                         save_family)

CTX, BATCH = 32, 4
B, T = 3, 24
SCALED = {"gemma", "gemma2", "gemma3"}
"""Families whose embeddings are scaled by sqrt(d_model) before block 0."""
POST_NORMS = {"gemma2": "post_feedforward_layernorm", "gemma3": "post_feedforward_layernorm",
              "olmo2": "post_feedforward_layernorm"}
"""Families with a norm after each block's sublayers, inside the residual sum: hidden_states read past it."""


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = save_family(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


def _start_id(family: str) -> int:
    """The token every packed context starts with: the family's BOS, or its EOS where it has none."""
    bos, eos, _ = FAMILY_SPECIALS[family]
    return SPECIAL_IDS[bos or eos]


def _ids(family: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (B, T), generator=g)
    ids[:, 0] = _start_id(family)
    ids[1, 10] = SPECIAL_IDS[FAMILY_SPECIALS[family][1]]  # an EOS inside a context
    return ids, ~torch.isin(ids, torch.tensor(list(SPECIAL_IDS.values())))


def _hidden(model, ids) -> tuple:
    with torch.no_grad():
        return model(ids, output_hidden_states=True, use_cache=False).hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_harvest_stores_output_hidden_states_and_flags_the_special_tokens(family, family_dir, tmp_path):
    folder = family_dir(family)

    def harvest(name, dtype, compute):
        return run_harvest(HarvestConfig(out=str(tmp_path / name), model=str(folder), dataset="builtin", tokens=8 * CTX,
                                         layers="all", context_len=CTX, batch_size=BATCH, dtype=dtype,
                                         compute_dtype=compute, progress=False, min_chunk_bytes=1024))

    # float32; a bf16 store of the float32 forward; a bf16 forward stored in bf16
    stores = [harvest("f32.zarr", "float32", "float32"), harvest("bf16.zarr", "bfloat16", "float32"),
              harvest("bf16-forward.zarr", "bfloat16", "bfloat16")]
    f32 = stores[0]
    models = [AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
              for dtype in (torch.float32, torch.bfloat16)]
    n = len(decoder_layers(models[0]))
    assert all(s.layers == list(range(n + 1)) and s.n_tokens == 8 * CTX for s in stores)
    ids = f32.token_ids(0, f32.n_tokens).view(-1, CTX)
    assert all(torch.equal(s.token_ids(0, s.n_tokens).view(-1, CTX), ids) for s in stores)
    for b in range(0, ids.shape[0], BATCH):  # the batches harvest ran, so the same kernels on the same shapes
        hidden, hidden_bf16 = (_hidden(model, ids[b:b + BATCH]) for model in models)
        span = (b * CTX, (b + BATCH) * CTX)
        for layer in f32.layers:
            want = hidden[layer].reshape(-1, FAMILY_WIDTH)
            assert torch.equal(f32.acts(layer, *span), want), (family, layer)
            # a bf16 store of the float32 forward: its rounding only
            assert torch.equal(stores[1].acts(layer, *span), want.bfloat16().float()), (family, layer)
            want = hidden_bf16[layer].reshape(-1, FAMILY_WIDTH).float()
            assert torch.equal(stores[2].acts(layer, *span), want), (family, layer)
    # every context starts with the BOS (the EOS where the family has none); flagged: exactly the special ids
    assert (ids[:, 0] == _start_id(family)).all()
    flat = ids.reshape(-1)
    assert torch.equal(f32.special(), torch.isin(flat, torch.tensor(list(SPECIAL_IDS.values()))))


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_with_and_without_a_bos_and_spelled_in_the_text(family):
    tok = family_tokenizer(family)
    bos, eos, pad = FAMILY_SPECIALS[family]
    special = SpecialTokens.of(tok)
    assert special.bos == SPECIAL_IDS[bos or eos] and special.eos == SPECIAL_IDS[eos]
    assert (tok.bos_token_id is None) == (bos is None) and (tok.pad_token_id is None) == (pad is None)
    # the tokenizer marks all three special, named or not: a document that spells one encodes to its
    # id, which must be flagged (Llama has no pad, Qwen no BOS, GPT-2 neither)
    assert special.flagged == frozenset(SPECIAL_IDS.values())
    docs = ["plain text <pad> then <bos> and <eos> spelled out.", "a second document, a little longer " * 3]
    assert tok(docs[0], add_special_tokens=False)["input_ids"].count(SPECIAL_IDS["<pad>"]) == 1
    ids = np.stack([c for c, _ in pack_contexts(lambda: iter(docs), tok, 12)])
    assert (ids[:, 0] == special.bos).all()
    np.testing.assert_array_equal(special.mask(ids), np.isin(ids, list(SPECIAL_IDS.values())))
    assert special.mask(ids).sum() > ids.shape[0] + 3


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_hooks_read_and_write_where_hidden_states_are_read(family):
    model = family_model(family)
    blocks = decoder_layers(model)
    n = len(blocks)
    ids, _ = _ids(family)
    hs = _hidden(model, ids)
    assert len(hs) == n + 1
    # hidden_states[0] is the embedding as the model scales or sums it
    emb = model.get_input_embeddings().weight[ids]
    if family in SCALED:
        assert torch.equal(hs[0], emb * torch.tensor(FAMILY_WIDTH**0.5, dtype=emb.dtype))
    elif family == "gpt2":
        assert torch.equal(hs[0], emb + model.transformer.wpe.weight[:T])
    else:
        assert torch.equal(hs[0], emb)
    if family in POST_NORMS:  # the test covers the norms after the sublayers
        assert all(hasattr(block, POST_NORMS[family]) for block in blocks)
    # harvest's capture, every layer including the last after the final norm
    with HiddenStateCapture(model, list(range(n + 1))) as capture:
        got = capture(ids)
    assert all(torch.equal(got[i], hs[i]) for i in range(n + 1))
    for i in range(n):  # and each alone, the forward stopped there
        with HiddenStateCapture(model, [i]) as capture:
            assert torch.equal(capture(ids)[0], hs[i])
    # the editor reads there ...
    seen: dict[int, torch.Tensor] = {}
    reads = {i: (lambda h, call, i=i: seen.__setitem__(i, h.clone())) for i in range(n)}
    with ResidualEditor(model, reads), torch.no_grad():
        model(ids, use_cache=False)
    assert sorted(seen) == list(range(n)) and all(torch.equal(seen[i], hs[i]) for i in range(n))
    # ... and writes what the next block reads
    for i in range(n):
        delta = 0.25 * torch.randn(hs[i].shape, generator=torch.Generator().manual_seed(i))
        inputs = []
        with ResidualEditor(model, {i: lambda h, call: h + delta}), torch.no_grad():
            tap = blocks[i].register_forward_pre_hook(
                lambda m, a, kw: inputs.append(a[0] if a else kw["hidden_states"]), with_kwargs=True)
            try:
                edited = model(ids, use_cache=False).logits
            finally:
                tap.remove()
        assert torch.equal(inputs[0], hs[i] + delta), (family, i)
        assert not torch.equal(edited, model(ids, use_cache=False).logits)
    # the names other tools give these states are the modules routesae hooks
    arch = type(model).__name__
    assert model.get_submodule(hook_names(0, n, arch).hf_module) is blocks[0]
    assert all(model.get_submodule(hook_names(i, n, arch).hf_module) is blocks[i - 1] for i in range(1, n))
    assert model.get_submodule(hook_names(n, n, arch).hf_module) is final_norm(model)


class _Splicer:
    """Replaces every non-special position at `layer` by fn(x)."""

    def __init__(self, name, layer, fn):
        self.name, self.layer, self.fn = name, layer, fn

    def clean_layers(self):
        return [self.layer]

    def plan(self, clean, keep, token_ids):
        return SplicePlan({self.layer: keep}, lambda layer, x, idx: self.fn(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_splice_changes_nothing_live_or_from_the_store(family):
    model = family_model(family)
    n = len(decoder_layers(model))
    ids, keep = _ids(family)
    sm = SpliceModel(model)
    clean = sm.clean(ids, {1}, 1)
    with torch.inference_mode():  # (Gemma 2's soft-capping runs in place on the head's logits)
        assert torch.equal(sm.logits(clean.final.reshape(B * T, -1)).view(B, T, -1), model(ids).logits.float())

    def splicers():
        return ([_Splicer(f"identity@{i}", i, lambda x: x) for i in range(n)]
                + [_Splicer("scaled@1", 1, lambda x: 0.6 * x + 0.05)])

    live = SpliceEvaluator(model, splicers(), chunk_positions=16, prefix="live")
    auto = SpliceEvaluator(model, splicers(), chunk_positions=16, prefix="auto")
    for seed in (0, 1):
        ids, keep = _ids(family, seed)
        hs = _hidden(model, ids)
        live.add_batch(ids, keep)
        auto.add_batch(ids, keep, stored=lambda layers, hs=hs: {layer: hs[layer] for layer in layers})
    assert auto.batches == {"live": 0, "store": 2}  # started from the store: the pass-through forward held
    results = live.results()
    assert auto.results() == results
    for r in results[:n]:
        assert r.kl_per_token == 0.0 and r.kl_per_context == 0.0 and r.delta_ce == 0.0 and r.loss_recovered == 1.0
    assert results[n].kl_per_token > 0  # a splice that changes something shows


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch,layers", [("topk", [1]), ("routesae", [1, 2])])
def test_no_op_steering_is_bit_identical(family, arch, layers):
    model = family_model(family)
    cfg = SAEConfig(arch=arch, d_model=FAMILY_WIDTH, n_latents=128, k=8, layers=layers, normalization="token")
    sae = build_sae(cfg, torch.Generator().manual_seed(0)).eval()
    ids = _ids(family)[0][:1]

    def run():
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=SPECIAL_IDS[FAMILY_SPECIALS[family][1]], output_logits=True,
                                 return_dict_in_generate=True)
        return logits, out.sequences, torch.stack(out.logits)

    clean = run()
    with steering(model, sae, [Edit(5, "mul", 1.0), Edit(6, "add", 0.0), Edit(7, "add", 0.0, where="active")]) as st:
        steered = run()
    assert all(torch.equal(a, b) for a, b in zip(steered, clean))
    assert len(st.records) == 1 + 4 and all(r.edited == 0 for r in st.records)  # on every forward, changing nothing
    with steering(model, sae, [Edit(9, "set", 30.0)]), torch.no_grad():  # the hooks are live
        assert not torch.equal(model(ids, use_cache=False).logits, clean[0])


def _unloadable(folder, config):
    """A folder with `config` and a weights file that is not one: read, it would fail otherwise."""
    config.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


@pytest.mark.parametrize("family,message", [
    ("t5", "is a t5 model, an encoder-decoder: routesae reads the residual stream of decoder-only causal LMs"),
    ("bart", "is a bart model, an encoder-decoder"),
    ("vit", "is a vit model, which transformers has no causal LM class for: routesae runs decoder-only causal LMs"),
    ("bert", "is a bert model (BertLMHeadModel), whose layout routesae does not know: cannot find the decoder layers"),
])
def test_a_family_routesae_cannot_run_is_refused_in_one_line_before_the_weights_load(family, message, tmp_path):
    import transformers

    config = transformers.AutoConfig.for_model(family)  # its full default size: no weight is ever made
    folder = _unloadable(tmp_path / family, config)
    for attempt in (lambda: load_config(str(folder)), lambda: load_model(str(folder), "float32", "cpu"),
                    lambda: check_layers_and_length(str(folder), None, "all", 16, "--context-len")):
        with pytest.raises(RouteSAEError) as e:
            attempt()
        assert message in str(e.value) and "\n" not in str(e.value)
    result = CliRunner().invoke(main, ["harvest", "--model", str(folder), "--dataset", "builtin", "--tokens", "64",
                                       "--context-len", "16", "--out", str(tmp_path / "s.zarr"), "--quiet"])
    assert result.exit_code == 1 and result.output.startswith("routesae: error: ") and message in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "s.zarr").exists()


def test_the_claimed_families_load_and_pass_the_family_check(family_dir):
    for family in ("gemma3", "gpt_neox"):  # one of each layout the check looks in
        loaded = load_model(str(family_dir(family)), "float32", "cpu")
        assert loaded.info["n_layers"] == 3 and loaded.info["d_model"] == FAMILY_WIDTH
