"""Known-answer forward tests on hand-checkable tensors, for each architecture."""

from __future__ import annotations

import math

import pytest
import torch

from routesae.errors import RouteSAEError
from routesae.train.config import SAEConfig
from routesae.train.normalize import apply_normalization, denormalize, normalize
from routesae.train.saes import build_sae
from routesae.train.coders import TopKCoder


def hand_coder() -> TopKCoder:
    """d_model 3, 4 latents, k 2, weights chosen so every number below is checkable by hand."""
    coder = TopKCoder(3, 4, 2)
    with torch.no_grad():
        coder.W_enc.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]))
        coder.b_enc.copy_(torch.tensor([0.0, 0, -1, 0.5]))
        coder.W_dec.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]))
        coder.b_dec.copy_(torch.tensor([0.5, 0, 0]))
    return coder


# x - b_dec = [2, 1, -3] -> pre = [2, 1, -4, 3.5] -> keep latents 3 (3.5) and 0 (2)
# x_hat = 2 * [1, 0, 0] + 3.5 * [0.6, 0.8, 0] + [0.5, 0, 0] = [4.6, 2.8, 0]
# second token: x - b_dec = [0, -1, -0.5] -> pre = [0, -1, -1.5, -0.5]: the top 2 are 0 and -0.5,
# the ReLU zeroes both (the authors' code, without ReLU, would keep -0.5) -> x_hat = b_dec
X = torch.tensor([[2.5, 1.0, -3.0], [0.5, -1.0, -0.5]])
Z = torch.tensor([[2.0, 0, 0, 3.5], [0, 0, 0, 0]])
X_HAT = torch.tensor([[4.6, 2.8, 0.0], [0.5, 0, 0]])


def test_topk_coder_known_answer():
    coder = hand_coder()
    torch.testing.assert_close(coder.pre_activations(X), torch.tensor([[2.0, 1, -4, 3.5], [0, -1, -1.5, -0.5]]))
    with torch.no_grad():
        z = coder.encode(X)
        torch.testing.assert_close(z, Z)
        torch.testing.assert_close(coder.decode(z), X_HAT)
        lat = coder.encode_sparse(X)
        assert sorted(lat.indices[0].tolist()) == [0, 3]
        torch.testing.assert_close(coder.decode_sparse(lat), X_HAT)


def test_training_kernel_matches_known_answer():
    coder = hand_coder()
    out = coder.forward_train(X, torch.float32)
    torch.testing.assert_close(out.x_hat, X_HAT)
    assert (out.values >= 0).all()
    assert sorted(out.indices[0].tolist()) == [0, 3] and sorted(out.values[0].tolist()) == [2.0, 3.5]
    assert out.values[1].tolist() == [0.0, 0.0]


def test_normalize_known_answer():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    x_norm, mean, std = normalize(x)
    s = math.sqrt(1.25) + 1e-6
    torch.testing.assert_close(x_norm, torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / s)
    assert mean.item() == 2.5 and abs(std.item() - s) < 1e-6
    torch.testing.assert_close(denormalize(x_norm, mean, std), x)
    # dataset scale: x * scale, undone by the returned std
    xd, m, sd = apply_normalization(x, "dataset", torch.tensor([2.0]))
    torch.testing.assert_close(xd, 2 * x)
    torch.testing.assert_close(denormalize(xd, m, sd), x)


def topk_sae(normalization: str = "token", scale=None):
    cfg = SAEConfig(arch="topk", d_model=3, n_latents=4, k=2, layers=[5], normalization=normalization, dataset_scale=scale)
    sae = build_sae(cfg)
    sae.coder.load_state_dict(hand_coder().state_dict())
    return sae.eval()


def test_topk_sae_normalizes_and_reconstructs_in_model_space():
    sae = topk_sae()
    x = torch.tensor([[10.0, 13.0, 7.0], [1.0, -2.0, 4.0]])
    x_norm, mean, std = normalize(x)
    torch.testing.assert_close(sae.encode(x), hand_coder().encode(x_norm).detach())
    want = hand_coder().decode(hand_coder().encode(x_norm)) * std + mean
    torch.testing.assert_close(sae.reconstruct(x), want.detach())
    # dataset normalization: a fixed factor, no shift
    sae = topk_sae("dataset", [0.5])
    torch.testing.assert_close(sae.encode(2 * X), Z)
    torch.testing.assert_close(sae.reconstruct(2 * X), 2 * X_HAT)


def route_sae(routing: str = "hard", aggregate: str = "sum"):
    cfg = SAEConfig(arch="routesae", d_model=4, n_latents=6, k=2, layers=[3, 4], routing=routing, aggregate=aggregate)
    sae = build_sae(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    return sae.eval()


# Two layers whose normalized values are a = [1,-1,1,-1] and b = [1,1,-1,-1]: the model-space
# inputs are 3a + 5 and 2b - 1. Router input (sum) = a + b = [2, 0, 0, -2]; logits = [2, 0];
# p = softmax = [e^2, 1] / (e^2 + 1).
A = torch.tensor([1.0, -1, 1, -1])
B = torch.tensor([1.0, 1, -1, -1])
X_LAYERS = torch.stack([3 * A + 5, 2 * B - 1])[None]  # [1, 2, 4]
P0 = math.exp(2) / (math.exp(2) + 1)


def test_routesae_hard_routing_is_p_times_argmax_layer():
    sae = route_sae()
    r = sae.route(X_LAYERS)
    assert r.layer_index.tolist() == [0]
    assert abs(r.weight.item() - P0) < 1e-5
    torch.testing.assert_close(r.probs, torch.tensor([[P0, 1 - P0]]))
    torch.testing.assert_close(sae.coder_input(X_LAYERS), P0 * A[None], atol=1e-5, rtol=1e-5)
    # the arg-max flips when the router prefers the second layer
    with torch.no_grad():
        sae.router.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, -1]]))  # logits [0, 2]
    torch.testing.assert_close(sae.coder_input(X_LAYERS), P0 * B[None], atol=1e-5, rtol=1e-5)
    # mean aggregation halves the router input: logits [1, 0]
    sae = route_sae(aggregate="mean")
    p = math.exp(1) / (math.exp(1) + 1)
    torch.testing.assert_close(sae.coder_input(X_LAYERS), p * A[None], atol=1e-5, rtol=1e-5)


def test_routesae_soft_routing_mixes_all_layers():
    sae = route_sae("soft")
    torch.testing.assert_close(sae.coder_input(X_LAYERS), (P0 * A + (1 - P0) * B)[None], atol=1e-5, rtol=1e-5)
    with pytest.raises(RouteSAEError, match="soft routing has no single layer"):
        sae.reconstruct(X_LAYERS)


def test_routesae_reconstruct_divides_p_out_and_denormalizes():
    sae = route_sae()
    rec = sae.reconstruct(X_LAYERS)
    inp = P0 * A[None]
    coder_out = sae.coder.decode(sae.coder.encode(inp)).detach()
    want = coder_out / P0 * 3 + 5  # layer 0: mean 5, std 3
    torch.testing.assert_close(rec.x_hat, want, atol=1e-4, rtol=1e-4)
    assert rec.layer_index.tolist() == [0] and abs(rec.weight.item() - P0) < 1e-5
    # external routing: a one-hot on layer 1 reconstructs layer 1 with p = 1
    rec1 = sae.reconstruct_with_probs(X_LAYERS, torch.tensor([[0.0, 1.0]]))
    want1 = sae.coder.decode(sae.coder.encode(B[None])).detach() * 2 - 1
    torch.testing.assert_close(rec1.x_hat, want1, atol=1e-4, rtol=1e-4)
    assert rec1.layer_index.tolist() == [1] and rec1.weight.item() == 1.0
    # encode/decode work in the coder's space: decode(encode(x)) is the coder's output
    torch.testing.assert_close(sae.decode(sae.encode(X_LAYERS)), coder_out, atol=1e-5, rtol=1e-5)


def test_wrong_input_shape_is_refused():
    with pytest.raises(ValueError, match="expects activations"):
        route_sae().encode(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="expects activations"):
        topk_sae().encode(torch.zeros(3, 2, 4))  # [batch, seq, d] is fine; a wrong width is not
