"""Real TopK / RouteSAE modules (random or identity weights) spliced into a tiny Llama: the routing
splice checked with hooks, identity reconstructions, baselines, soft routing."""

from __future__ import annotations

import pytest
import torch

from routesae.errors import RouteSAEError
from routesae.evaluate.splice import SpliceEvaluator, SpliceModel
from routesae.evaluate.targets import Target, random_layers
from routesae.model.loading import decoder_layers
from routesae.train.config import SAEConfig
from routesae.train.saes import build_sae
from tiny_models import tiny_model

B, T, D = 3, 20, 64
ROUTED = [1, 2, 3]


def _model(dtype=torch.float32):
    return tiny_model("llama").to(dtype).requires_grad_(False)


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (B, T), generator=g)
    ids[:, 0] = 1
    ids[2, 7] = 2
    return ids, (ids != 1) & (ids != 2)


def _sae(arch, k=8, n_latents=128, routing="hard", seed=0):
    layers = ROUTED if arch == "routesae" else [2]
    cfg = SAEConfig(arch=arch, d_model=D, n_latents=n_latents, k=k, layers=layers, routing=routing)
    sae = build_sae(cfg, torch.Generator().manual_seed(seed)).eval()
    if arch == "routesae":
        with torch.no_grad():  # a sharper router, so tokens spread over all routed layers
            sae.router.weight.mul_(30)
    return sae


def _identity(arch, routing="hard"):
    """A real SAE whose TopK dictionary is exactly the identity: latents [x; -x], k = d, ReLU keeps
    the positive half, and the decoder adds them back."""
    sae = _sae(arch, k=D, n_latents=2 * D, routing=routing)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.coder.W_enc.copy_(torch.cat([eye, -eye]))
        sae.coder.W_dec.copy_(torch.cat([eye, -eye]))
        sae.coder.b_enc.zero_()
        sae.coder.b_dec.zero_()
    return sae


def _hidden_states(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def _continue_recording_blocks(model, sm, clean, plan):
    """Run the spliced continuation with hooks that record each block's input and output,
    [B * T, D] per block index. -> (inputs, outputs)."""
    inputs, outputs, handles = {}, {}, []
    for j, block in enumerate(decoder_layers(model)):
        handles.append(block.register_forward_pre_hook(lambda m, a, j=j: inputs.__setitem__(j, a[0].reshape(B * T, D).clone())))
        handles.append(block.register_forward_hook(lambda m, a, o, j=j: outputs.__setitem__(j, (o[0] if isinstance(o, tuple) else o).reshape(B * T, D).clone())))
    try:
        sm.continue_from(clean, plan)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


@pytest.mark.parametrize("routing", ["router", "uniform", "random-layer"])
def test_hard_routing_splice_modifies_exactly_the_routed_layer_of_each_token(routing):
    model = _model()
    ids, keep = _ids()
    sae = _sae("routesae")
    target = Target("route", sae, routing, seed=5)
    token_index = torch.arange(B * T).view(B, T) + 1000
    sm = SpliceModel(model)
    clean = sm.clean(ids, set(ROUTED), 1)
    plan = target.splicer().plan({layer: clean.inputs[layer] for layer in ROUTED}, keep, token_index)

    # Which layer each token should be spliced at, computed independently of the plan.
    hs = _hidden_states(model, ids)
    flat_keep = keep.reshape(-1)
    stack = torch.stack([hs[layer].reshape(B * T, D) for layer in ROUTED], dim=1)[flat_keep]
    if routing == "router":
        want_index = sae.route(stack).layer_index
    else:  # both baselines draw the same random routed layer per token (uniform's tie broken at random)
        want_index = random_layers(token_index.reshape(-1)[flat_keep], len(ROUTED), 5)
    want = torch.full((B * T,), -1)
    want[flat_keep] = torch.tensor(ROUTED)[want_index]
    assert len(set(want[flat_keep].tolist())) == len(ROUTED)  # the test covers every layer

    inputs, outputs = _continue_recording_blocks(model, sm, clean, plan)
    blocks = decoder_layers(model)
    start = min(inputs)
    modified = torch.zeros(B * T, len(blocks), dtype=torch.bool)
    for j in inputs:
        before = outputs[j - 1] if j > start else hs[j].reshape(B * T, D)
        modified[:, j] = (inputs[j] != before).any(-1)
    for t in range(B * T):
        layers_changed = modified[t].nonzero().squeeze(1).tolist()
        assert layers_changed == ([] if want[t] < 0 else [int(want[t])]), (t, layers_changed, int(want[t]))
    # and the value spliced in at the routed layer is the reconstruction of the live activation there
    for t in range(B * T):
        if want[t] < 0:
            continue
        j = int(want[t])
        live = (outputs[j - 1] if j > start else hs[j].reshape(B * T, D))[t]
        i = ROUTED.index(j)
        full = stack[flat_keep[: t + 1].sum() - 1] if routing == "router" else None
        if routing == "router":
            p = sae.route(full[None]).weight
        elif routing == "uniform":
            p = torch.tensor([1 / 3])
        else:
            p = torch.tensor([1.0])
        rec = sae.reconstruct_at(live.expand(1, 3, D), torch.tensor([i]), p).x_hat[0]
        torch.testing.assert_close(inputs[j][t], rec, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "routesae"])
def test_identity_sae_gives_kl_0_delta_ce_0_loss_recovered_1(arch):
    model = _model(torch.bfloat16)
    ids, keep = _ids(1)
    ev = SpliceEvaluator(model, [Target("id", _identity(arch)).splicer()])
    ev.add_batch(ids, keep)
    (r,) = ev.results()
    assert abs(r.kl_per_token) < 1e-6
    assert abs(r.delta_ce) < 1e-6
    assert r.loss_recovered == pytest.approx(1.0, abs=1e-5)
    assert sum(r.replaced_per_layer.values()) == int(keep.sum())  # every non-special token, once


def test_random_sae_is_worse_than_identity_and_zero_ablation_is_worse_than_both():
    model = _model()
    ids, keep = _ids(2)
    ev = SpliceEvaluator(model, [Target("rand", _sae("topk")).splicer(), Target("id", _identity("topk")).splicer()])
    ev.add_batch(ids, keep)
    rand, ident = ev.results()
    assert rand.kl_per_token > ident.kl_per_token + 1e-4
    assert rand.ce_zero == ident.ce_zero  # same layer, same positions: one shared zero-ablation
    assert rand.ce_clean == ident.ce_clean


def test_soft_routing_cannot_be_spliced_but_has_cache_metrics():
    target = Target("soft", _sae("routesae", routing="soft"))
    assert not target.can_splice
    with pytest.raises(RouteSAEError, match="soft routing"):
        target.splicer()
    g = torch.Generator().manual_seed(0)
    acts = {layer: torch.randn(50, D, generator=g) for layer in ROUTED}
    out = target.cache_batch(acts, torch.arange(50))
    assert out.x is None and out.coder_in.shape == (50, D) and out.probs.shape == (50, 3)


def test_random_layers_is_uniform_and_a_function_of_the_token():
    idx = torch.arange(300_000)
    layers = random_layers(idx, 16, seed=0)
    counts = torch.bincount(layers, minlength=16).float()
    assert counts.min() > 0.95 * 300_000 / 16 and counts.max() < 1.05 * 300_000 / 16
    assert torch.equal(random_layers(idx[1000:2000], 16, 0), layers[1000:2000])
    assert not torch.equal(random_layers(idx[:1000], 16, 1), layers[:1000])


@pytest.mark.parametrize("layer", ROUTED)
def test_crosscoder_layer_splice_modifies_exactly_its_layer_with_the_joint_reconstruction(layer):
    from routesae.evaluate.targets import LayerOfJointTarget

    model = _model()
    ids, keep = _ids()
    cfg = SAEConfig(arch="crosscoder", d_model=D, n_latents=128, k=8, layers=ROUTED)
    sae = build_sae(cfg, torch.Generator().manual_seed(0)).eval()
    target = LayerOfJointTarget(f"cc @{layer}", sae, layer)
    sm = SpliceModel(model)
    clean = sm.clean(ids, set(ROUTED), 1)
    plan = target.splicer().plan({x: clean.inputs[x] for x in ROUTED}, keep, torch.zeros(B, T, dtype=torch.long))
    assert set(plan.masks) == {layer}

    hs = _hidden_states(model, ids)
    flat_keep = keep.reshape(-1)
    stack = torch.stack([hs[x].reshape(B * T, D) for x in ROUTED], dim=1)[flat_keep]
    want = sae.reconstruct(stack)[:, ROUTED.index(layer)]  # from the clean activations of all three layers

    inputs, outputs = _continue_recording_blocks(model, sm, clean, plan)
    start = min(inputs)
    for j in inputs:
        before = outputs[j - 1] if j > start else hs[j].reshape(B * T, D)
        changed = (inputs[j] != before).any(-1)
        if j == layer:
            assert torch.equal(changed, flat_keep)  # every non-special position, and only those
            torch.testing.assert_close(inputs[j][flat_keep], want, rtol=1e-5, atol=1e-5)
        else:
            assert not changed.any(), j  # no other layer's input differs from its block's clean output


def test_crosscoder_exports_the_per_layer_layouts():
    cfg = SAEConfig(arch="crosscoder", d_model=D, n_latents=32, k=4, layers=ROUTED)
    sae = build_sae(cfg, torch.Generator().manual_seed(1))
    t = sae.export_tensors()
    assert t["W_enc"].shape == (3, D, 32) and t["W_dec"].shape == (32, 3, D) and t["b_dec"].shape == (3, D)
    x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(2))
    x_norm, mean, std = sae.normalize_input(x)
    # the equations, from the exported tensors: f = TopK(sum_l W_enc^l (x^l - b_dec^l) + b_enc), x_hat^l = W_dec^l f + b_dec^l
    pre = torch.einsum("nld,lds->ns", x_norm - t["b_dec"], t["W_enc"]) + t["b_enc"]
    top = pre.topk(4, dim=-1)
    f = torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu())
    x_hat = torch.einsum("ns,sld->nld", f, t["W_dec"]) + t["b_dec"]
    torch.testing.assert_close(sae.reconstruct(x), x_hat * std + mean, rtol=1e-4, atol=1e-4)
    other = build_sae(cfg)
    other.load_exported(t)
    torch.testing.assert_close(other.reconstruct(x), sae.reconstruct(x))


def test_a_crosscoders_layer_targets_encode_each_batch_once_and_agree_with_their_own():
    from routesae.evaluate.targets import JointCodes, LayerOfJointTarget

    cfg = SAEConfig(arch="crosscoder", d_model=D, n_latents=64, k=4, layers=ROUTED)
    sae = build_sae(cfg, torch.Generator().manual_seed(3)).eval()
    calls = []
    encode = sae.coder.encode_sparse
    sae.coder.encode_sparse = lambda x: calls.append(1) or encode(x)
    g = torch.Generator().manual_seed(4)
    acts = {layer: torch.randn(30, D, generator=g) for layer in ROUTED}
    codes = JointCodes()
    shared = [LayerOfJointTarget(f"cc @{x}", sae, x, codes).cache_batch(acts, torch.arange(30)) for x in ROUTED]
    assert len(calls) == 1  # one encode for the three layers' rows
    alone = [LayerOfJointTarget(f"cc @{x}", sae, x).cache_batch(acts, torch.arange(30)) for x in ROUTED]
    assert len(calls) == 4
    for a, b in zip(shared, alone):
        for u, v in zip(a, b):
            assert (u is None and v is None) or torch.equal(u, v)
    # another batch (other tensors, even of the same shape) is encoded anew
    acts2 = {layer: t.clone() + 1 for layer, t in acts.items()}
    LayerOfJointTarget("cc @1", sae, 1, codes).cache_batch(acts2, torch.arange(30))
    assert len(calls) == 5
