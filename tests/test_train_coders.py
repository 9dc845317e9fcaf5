"""The coders (how an SAE makes its code sparse), each against its equations written out plainly
here; their gradients where they are not autograd's own; and what they learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from routesae.train.coders import CODERS, BatchTopKCoder, GatedCoder, JumpReLUCoder, ReLUCoder, build_coder
from routesae.train.coders.base import per_input_norm
from routesae.train.coders.relu import DECODER_INIT_NORM
from routesae.train.sparse_ops import select_batch_topk
from routesae.train.sparsity import PROPORTIONAL, SMOOTHING, STEER_RATE, SparsityControl

D, N = 4, 6


def grad_max(p: torch.Tensor) -> float:
    """Largest |gradient| of a parameter (0 where autograd found no path to it)."""
    return 0.0 if p.grad is None else float(p.grad.abs().max())


def hand_weights(coder, seed: int = 0) -> None:
    """Non-trivial values for every parameter (biases too), so no term of an equation hides behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 1.0))


def sae_lens_encode(name: str, t: dict[str, np.ndarray], x: np.ndarray, k: int) -> np.ndarray:
    """Encode from the exported tensors (SAELens orientation: W_enc [d_in, d_sae]), in numpy, from
    the papers' equations; x' = x - b_dec."""
    xc = x - t["b_dec"]
    if name == "gated":
        shared = xc @ t["W_enc"]
        gate = shared + t["b_gate"]
        mag = shared * np.exp(t["r_mag"]) + t["b_mag"]
        return (gate > 0) * np.maximum(mag, 0)
    pre = xc @ t["W_enc"] + t["b_enc"]
    if name == "relu":
        return np.maximum(pre, 0)
    if name in ("jumprelu", "batchtopk", "matryoshka"):
        return pre * (pre > t["threshold"])
    if name == "topk":
        out = np.zeros_like(pre)
        top = np.argsort(-pre, axis=1)[:, :k]
        rows = np.arange(len(pre))[:, None]
        out[rows, top] = np.maximum(pre[rows, top], 0)
        return out
    raise ValueError(name)


@pytest.mark.parametrize("name", sorted(CODERS))
def test_exported_tensors_encode_and_decode_as_the_equations_say(name):
    coder = build_coder(name, D, N, 2, **({"prefixes": [2, 4]} if name == "matryoshka" else {}))
    hand_weights(coder)
    if name in ("batchtopk", "matryoshka"):
        coder.threshold_estimate.fill_(0.4)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(1))
    t = {key: v.double().numpy() for key, v in coder.export_tensors().items()}
    want = sae_lens_encode(name, t, x.double().numpy(), 2)
    with torch.no_grad():
        z = coder.encode(x)
    np.testing.assert_allclose(z.double().numpy(), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        decoded, sparse = coder.decode(z), coder.decode_sparse(coder.encode_sparse(x))
    np.testing.assert_allclose(decoded.double().numpy(), want @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sparse.numpy(), decoded.numpy(), atol=1e-5)  # the sparse form decodes the same
    # and the export loads back into a fresh coder
    other = build_coder(name, D, N, 2, **({"prefixes": [2, 4]} if name == "matryoshka" else {}))
    other.load_exported(coder.export_tensors())
    with torch.no_grad():
        assert torch.equal(other.encode(x), z)


@pytest.mark.parametrize("name", ["relu", "gated", "jumprelu"])
def test_training_forward_matches_inference_and_its_penalty(name):
    coder = build_coder(name, D, N, 0)
    hand_weights(coder)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(2))
    out = coder.forward_train(x, torch.float32, sparsity_coef=0.7)
    with torch.no_grad():
        z = coder.encode(x)
    torch.testing.assert_close(out.x_hat, coder.decode(z), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.active, z > 0)
    norm2 = x.pow(2).sum(-1)
    t = coder.export_tensors()
    if name == "relu":
        want = 0.7 * (z @ t["W_dec"].norm(dim=1) / norm2).mean()
    elif name == "jumprelu":
        want = 0.7 * ((z > 0).sum(-1) / norm2).mean()
    else:
        gate = (x - t["b_dec"]) @ t["W_enc"] + t["b_gate"]
        via_gate = gate.relu() @ t["W_dec"] + t["b_dec"]
        want = 0.7 * (gate.relu().sum(-1) / norm2).mean() + ((x - via_gate).pow(2).sum(-1) / norm2).mean()
    torch.testing.assert_close(out.penalty, want, rtol=1e-5, atol=1e-7)


def test_jumprelu_threshold_gradient_is_the_straight_through_formula():
    coder = JumpReLUCoder(D, N, bandwidth=0.5)
    hand_weights(coder, seed=3)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(4)) * 2
    coef = 0.3
    out = coder.forward_train(x, torch.float32, sparsity_coef=coef)
    recon = ((out.x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean()
    (recon + out.penalty).backward()
    with torch.no_grad():
        pre = (x - coder.b_dec) @ coder.W_enc.T + coder.b_enc
        theta, eps = coder.threshold, 0.5
        kernel = ((pre - theta).abs() < eps / 2).float() / eps  # K((pre - theta) / eps) / eps
        f = pre * (pre > theta)
        x_hat = f @ coder.W_dec + coder.b_dec
        norm2 = x.pow(2).sum(-1, keepdim=True)
        d_f = 2 * (x_hat - x) @ coder.W_dec.T / norm2 / len(x)  # d recon / d f
        want = (d_f * -theta * kernel).sum(0) + coef * (-kernel / norm2 / len(x)).sum(0)
    assert float(kernel.sum()) > 0  # some pre-activations fall in the window: the test means something
    torch.testing.assert_close(coder.threshold.grad, want, rtol=1e-5, atol=1e-7)
    # pre-activations learn through the hard mask only: the L0 term gives them nothing
    coder.zero_grad()
    coder.forward_train(x, torch.float32, sparsity_coef=1.0).penalty.backward()
    assert grad_max(coder.W_enc) == 0 and grad_max(coder.threshold) > 0


def test_gated_auxiliary_term_reaches_the_gate_bias():
    coder = GatedCoder(D, N)
    hand_weights(coder, seed=5)
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(6))
    out = coder.forward_train(x, torch.float32, sparsity_coef=0.0)  # the penalty is the auxiliary term alone
    ((out.x_hat - x).pow(2).sum(-1).mean()).backward(retain_graph=True)
    assert grad_max(coder.b_gate) == 0  # the gate is a step: reconstruction cannot move it
    coder.zero_grad()
    out.penalty.backward()
    assert grad_max(coder.b_gate) > 0
    # the decoder is frozen in the auxiliary term (the paper's choice)
    assert grad_max(coder.W_dec) == 0 and grad_max(coder.b_dec) > 0  # b_dec still moves through x - b_dec


def test_batch_topk_keeps_k_times_n_over_the_whole_batch():
    pre = torch.randn(10, 50, generator=torch.Generator().manual_seed(7))
    values, indices = select_batch_topk(pre, 3)
    kept = values > 0
    naive = pre.relu().reshape(-1).topk(30).values
    got = torch.sort(values[kept], descending=True).values
    torch.testing.assert_close(got, naive[naive > 0])
    assert torch.equal(pre[torch.arange(10)[:, None].expand_as(indices)[kept], indices[kept]], values[kept])
    # per token the count varies: that is the point
    assert len(set(kept.sum(1).tolist())) > 1


def test_sparsity_control_warms_up_then_steers():
    c = SparsityControl(coef=2.0, warmup=0.1, target_l0=10)
    assert c.value(0.0) == 0 and c.value(0.05) == pytest.approx(1.0) and c.value(0.5) == 2.0
    c.update(40, 0.05)  # during the warm-up nothing is steered
    assert c.coef == 2.0
    c.update(40, 0.5)  # too many active latents: the coefficient rises, clipped at a log error of 1
    assert c.coef == pytest.approx(2.0 * math.exp(STEER_RATE))
    # the proportional part rides on the integral one in what is applied
    assert c.value(0.5) == pytest.approx(c.coef * math.exp(PROPORTIONAL))
    c.update(5, 0.6)  # it reads a running L0, still too many
    assert c.l0_average == pytest.approx(SMOOTHING * 40 + (1 - SMOOTHING) * 5)
    assert c.coef == pytest.approx(2.0 * math.exp(2 * STEER_RATE))
    c.update(2, 0.6)  # 0.8 * 33 + 0.2 * 2 = 26.8 here: the error is log(L0 / target), unclipped below 1
    assert c.error == pytest.approx(math.log(c.l0_average / 10))
    for _ in range(60):  # a sustained low L0 brings it down
        c.update(5, 0.7)
    assert c.coef < 2.0 and c.l0_average == pytest.approx(5, rel=0.05)
    assert c.value(0.7) < c.coef  # and the proportional part lowers it further
    zero = SparsityControl(coef=2.0, warmup=0.0, target_l0=10)
    zero.update(0.0, 0.5)  # no latent fires: the largest error down, not log(0)
    assert zero.error == -1.0 and zero.coef == pytest.approx(2.0 * math.exp(-STEER_RATE))
    restored = SparsityControl(**{k: v for k, v in c.state().items() if k != "error"})  # an older checkpoint
    assert restored.error == 0.0
    fixed = SparsityControl(coef=2.0, warmup=0.0)
    fixed.update(40, 0.5)
    assert fixed.coef == 2.0


def test_per_input_norm_is_the_nmse_unit():
    x = torch.full((3, 4), 0.5)  # ||x||^2 = 1
    assert float(per_input_norm(torch.tensor([1.0, 2.0, 3.0]), x)) == pytest.approx(2.0)


def test_relu_coder_starts_from_the_april_2024_recipe():
    c = ReLUCoder(D, N, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(c.W_dec.norm(dim=1), torch.full((N,), DECODER_INIT_NORM))
    assert torch.equal(c.W_enc, c.W_dec) and not c.fixed_l0
    assert BatchTopKCoder.fixed_l0 and not GatedCoder.fixed_l0


def test_jumprelu_with_a_target_penalizes_the_distance_to_it():
    coder = JumpReLUCoder(D, N, k=2)
    hand_weights(coder, seed=8)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(9))
    out = coder.forward_train(x, torch.float32, sparsity_coef=0.5)  # the first batch also places the thresholds
    with torch.no_grad():
        l0 = (coder.encode(x) != 0).sum(-1).float().mean()
    torch.testing.assert_close(out.penalty, 0.5 * (l0 / 2 - 1) ** 2)
    assert abs(float(l0) - 2) <= 0.5  # started at the target: each latent fires on 2/6 of this batch


def test_a_crosscoders_l1_weighs_the_sum_of_its_per_layer_decoder_norms():
    coder = ReLUCoder(2 * D, N, blocks=2)
    hand_weights(coder, seed=10)
    x = torch.randn(9, 2 * D, generator=torch.Generator().manual_seed(11))
    out = coder.forward_train(x, torch.float32, sparsity_coef=0.7)
    with torch.no_grad():
        f = coder.encode(x)
        per_layer = coder.W_dec[:, :D].norm(dim=1) + coder.W_dec[:, D:].norm(dim=1)
    torch.testing.assert_close(out.penalty, 0.7 * (f @ per_layer / x.pow(2).sum(-1)).mean(), rtol=1e-5, atol=1e-7)
    assert float((per_layer - coder.W_dec.detach().norm(dim=1)).min()) > 0  # not the norm of the whole row
