"""The sparse training steps of JumpReLU, ReLU + L1 and gated against their equations as plain dense
autograd, and each coder's sparse and dense steps against each other."""

from __future__ import annotations

import pytest
import torch

from routesae.train import sparse_threshold
from routesae.train.coders.gated import GatedCoder
from routesae.train.coders.jumprelu import JumpReLUCoder
from routesae.train.coders.relu import ReLUCoder
from routesae.train.sparse_threshold import candidate_mask, gated_sae_forward, jumprelu_sae_forward, relu_sae_forward


def dense_jumprelu(x, W_enc, b_enc, W_dec, b_dec, theta, eps):
    """The textbook step: dense pre-activations; f = pre * 1[pre > theta] with gradient to pre through
    the mask and to theta -theta K / eps; l0 = sum 1[pre > theta] with gradient -K / eps to theta only
    (K = 1[|pre - theta| < eps / 2]), both written as value + (surrogate - surrogate.detach())."""
    pre = (x - b_dec) @ W_enc.T + b_enc
    mask = (pre > theta).float()
    window = ((pre - theta).abs() < eps / 2).float().detach()
    # surrogates whose gradients in theta are exactly -theta K / eps and -K / eps, values unchanged
    f = pre * mask - (window * theta.detach() / eps * (theta - theta.detach()))
    l0 = mask.sum(-1) - (window / eps * (theta - theta.detach())).sum(-1)
    return f @ W_dec + b_dec, l0, mask.bool().any(0)


def problem(n=200, d=8, m=96, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).requires_grad_()
    W_enc = (torch.randn(m, d, generator=g) / d**0.5).requires_grad_()
    b_enc = (0.2 * torch.randn(m, generator=g)).requires_grad_()
    W_dec = torch.randn(m, d, generator=g).requires_grad_()
    b_dec = (0.1 * torch.randn(d, generator=g)).requires_grad_()
    theta = (0.6 + 0.5 * torch.rand(m, generator=g)).requires_grad_()
    return x, W_enc, b_enc, W_dec, b_dec, theta


def loss_of(x_hat, l0, g):
    """A loss whose gradient reaches every output: a random projection of x_hat and a per-token
    weighting of l0 (the unnormalized-penalty case, where every token's l0 gradient differs)."""
    gx = torch.randn(x_hat.shape, generator=g)
    gl = torch.rand(l0.shape, generator=g)
    return (x_hat * gx).sum() + (l0 * gl).sum()


def test_sparse_step_equals_the_dense_equations_forward_and_every_gradient():
    eps = 0.3
    inputs = problem()
    x, W_enc, b_enc, W_dec, b_dec, theta = inputs
    with torch.no_grad():
        product = (x - b_dec) @ W_enc.T
        candidates = candidate_mask(product, b_enc, theta - eps / 2)
    out = jumprelu_sae_forward(x, W_enc, b_enc, W_dec, b_dec, theta, eps, product, candidates)
    loss_of(out.x_hat, out.l0, torch.Generator().manual_seed(9)).backward()
    got = [p.grad.clone() for p in inputs]
    for p in inputs:
        p.grad = None
    x_hat, l0, fired = dense_jumprelu(*inputs, eps)
    loss_of(x_hat, l0, torch.Generator().manual_seed(9)).backward()
    want = [p.grad.clone() for p in inputs]

    density = float(candidates.float().mean())
    assert 0.05 < density < 0.5  # a real mix of candidates and not
    torch.testing.assert_close(out.x_hat, x_hat.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.l0, l0.detach()) and torch.equal(out.fired, fired)
    assert float(want[5].abs().sum()) > 0  # the window holds entries: the theta check means something
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec", "theta"], got, want):
        # sums of many terms of either sign: their rounding scales with the largest
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()), msg=name)


def test_candidates_in_bf16_hold_every_entry_near_or_above_a_threshold():
    """The floor is compared in bf16: every entry whose float32 pre-activation (bf16 product + float32
    bias, as the dense step computes it) clears theta - eps / 2 must be a candidate, also the entries
    closest to the floor from above."""
    g = torch.Generator().manual_seed(3)
    n, m, eps = 512, 64, 0.2
    b_enc = 3 * torch.randn(m, generator=g)
    theta = torch.rand(m, generator=g) * 4
    low = theta - eps / 2
    # products spread around the exact cut, many within a bf16 rounding of it
    cut = (low - b_enc)[None, :]
    product = (cut + cut.abs() * torch.randn(n, m, generator=g) * 2**-6).bfloat16()
    needed = product.float() + b_enc > low
    candidates = candidate_mask(product, b_enc, low)
    assert bool(needed.any()) and bool((~needed).any())
    assert not bool((needed & ~candidates).any())
    # and the margin is narrow: an extra candidate lies within 2^-6 of |low| + |b_enc| under the cut
    extra = candidates & ~needed
    assert bool(extra.any())
    slack = (cut - product.float()) / (low.abs() + b_enc.abs())
    assert float(slack[extra].max()) < 2**-6


@pytest.mark.parametrize("k,coef", [(16, 1.0), (0, 0.05)])
def test_coder_sparse_and_dense_steps_agree(monkeypatch, k, coef):
    """The coder's two steps (sparse below SPARSE_UP_TO of candidates, dense above) give the same
    reconstruction, L0, penalty and gradients (float32; the decode's summation order differs)."""
    n, d, m = 256, 16, 128
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(5)) * 4

    def run(share: float):
        monkeypatch.setattr(sparse_threshold, "SPARSE_UP_TO", share)
        coder = JumpReLUCoder(d, m, k=k, generator=torch.Generator().manual_seed(0))
        coder.train()
        with torch.no_grad():  # thresholds off the target L0, so the penalty has a gradient
            coder.threshold.copy_(torch.rand(m, generator=torch.Generator().manual_seed(1)) + 1.5)
            coder.started.fill_(True)
        out = coder.forward_train(x, torch.float32, sparsity_coef=coef)
        loss = ((out.x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean() + out.penalty
        loss.backward()
        grads = {name: p.grad.clone() for name, p in coder.named_parameters()}
        fired = out.fired if out.fired is not None else out.active.any(0)
        return out, fired, grads

    sparse, sparse_fired, sparse_grads = run(1.0)
    dense, dense_fired, dense_grads = run(0.0)
    assert sparse.active is None and dense.active is not None  # each path ran
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse.l0, dense.l0) and torch.equal(sparse_fired, dense_fired)
    torch.testing.assert_close(sparse.penalty, dense.penalty)
    assert float(dense_grads["threshold"].abs().max()) > 0
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_coder_in_bf16_fires_the_latents_the_dense_step_fires(monkeypatch):
    """bf16 compute: the sparse step's product is the dense step's (same bf16 matmul, float32 bias),
    so the same latents fire; gradients agree to bf16's precision (the sparse decode is float32)."""
    n, d, m = 512, 64, 512
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(7)) * 3
    outs = {}
    for share in (1.0, 0.0):
        monkeypatch.setattr(sparse_threshold, "SPARSE_UP_TO", share)
        coder = JumpReLUCoder(d, m, k=16, generator=torch.Generator().manual_seed(0))
        coder.train()
        out = coder.forward_train(x, torch.bfloat16, sparsity_coef=1.0)
        ((out.x_hat - x).pow(2).sum(-1).mean() + out.penalty).backward()
        outs[share] = (out, coder.threshold.grad.clone(), coder.W_enc.grad.clone())
    (sp, sp_theta, sp_enc), (de, de_theta, de_enc) = outs[1.0], outs[0.0]
    assert sp.active is None and de.active is not None
    assert torch.equal(sp.l0, de.l0)
    torch.testing.assert_close(sp.x_hat, de.x_hat, rtol=0.02, atol=0.05)
    assert float(torch.nn.functional.cosine_similarity(sp_enc.flatten(), de_enc.flatten(), dim=0)) > 0.999
    assert float(torch.nn.functional.cosine_similarity(sp_theta, de_theta, dim=0)) > 0.99


def test_relu_sparse_step_equals_the_dense_equations_forward_and_every_gradient():
    """f = ReLU(pre), the L1 weighted by the decoder rows' norms (differentiable, as in the
    April-2024 form): forward, L0, fired latents and every gradient, the norms' path included."""
    inputs = problem(seed=2)
    x, W_enc, b_enc, W_dec, b_dec, _ = inputs
    with torch.no_grad():
        b_enc.sub_(1.0)  # about a fifth of the entries positive
        product = (x - b_dec) @ W_enc.T
        candidates = candidate_mask(product, b_enc, torch.zeros_like(b_enc))
    params = inputs[:5]
    out = relu_sae_forward(x, W_enc, b_enc, W_dec, b_dec, W_dec.norm(dim=1), product, candidates)
    loss_of(out.x_hat, out.weighted_l1, torch.Generator().manual_seed(4)).backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    f = ((x - b_dec) @ W_enc.T + b_enc).relu()
    x_hat, weighted_l1 = f @ W_dec + b_dec, f @ W_dec.norm(dim=1)
    loss_of(x_hat, weighted_l1, torch.Generator().manual_seed(4)).backward()
    want = [p.grad.clone() for p in params]

    assert 0.05 < float(candidates.float().mean()) < 0.5
    torch.testing.assert_close(out.x_hat, x_hat.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.weighted_l1, weighted_l1.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.l0, (f > 0).sum(-1).float()) and torch.equal(out.fired, (f > 0).any(0))
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()), msg=name)


def assert_sparse_and_dense_steps_agree(monkeypatch, make_coder, x: torch.Tensor) -> None:
    """A coder's sparse step (SPARSE_UP_TO 1) against its dense one (0), from the same weights: the
    same reconstruction, penalty, L0, fired latents and gradients (float32)."""

    def run(share: float):
        monkeypatch.setattr(sparse_threshold, "SPARSE_UP_TO", share)
        coder = make_coder()
        coder.train()
        out = coder.forward_train(x, torch.float32, sparsity_coef=2.0)
        (((out.x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean() + out.penalty).backward()
        l0 = out.l0 if out.l0 is not None else out.active.sum(-1).float()
        fired = out.fired if out.fired is not None else out.active.any(0)
        return out, l0, fired, {name: p.grad.clone() for name, p in coder.named_parameters()}

    sparse, sparse_l0, sparse_fired, sparse_grads = run(1.0)
    dense, dense_l0, dense_fired, dense_grads = run(0.0)
    assert sparse.active is None and dense.active is not None  # each path ran
    assert 0 < float(dense_l0.mean()) < x.shape[1] * 2
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.penalty, dense.penalty)
    assert torch.equal(sparse_l0, dense_l0) and torch.equal(sparse_fired, dense_fired)
    for name in dense_grads:
        scale = float(dense_grads[name].abs().max())
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("blocks", [1, 2])  # 2: a crosscoder's decoder, the norms of its layers summed
def test_relu_coder_sparse_and_dense_steps_agree(monkeypatch, blocks):
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(6)) * 4
    assert_sparse_and_dense_steps_agree(
        monkeypatch, lambda: ReLUCoder(16, 128, k=8, generator=torch.Generator().manual_seed(0), blocks=blocks), x)


def test_gated_sparse_step_equals_the_dense_equations_forward_and_every_gradient():
    """pi_gate = s + b_gate, pi_mag = exp(r_mag) s + b_mag (s = (x - b_dec) W_enc^T),
    f = 1[pi_gate > 0] ReLU(pi_mag); the gate path's decode with W_dec and b_dec frozen."""
    x, W_enc, b_gate, W_dec, b_dec, _ = problem(seed=8)
    g = torch.Generator().manual_seed(11)
    b_mag = (0.3 * torch.randn(W_enc.shape[0], generator=g)).requires_grad_()
    r_mag = (0.2 * torch.randn(W_enc.shape[0], generator=g)).requires_grad_()
    with torch.no_grad():
        b_gate.sub_(1.0)
        product = (x - b_dec) @ W_enc.T
        candidates = candidate_mask(product, b_gate, torch.zeros_like(b_gate))
    params = [x, W_enc, b_gate, W_dec, b_dec, b_mag, r_mag]

    def loss(x_hat, via_gate, gate_l1, seed=12):
        gen = torch.Generator().manual_seed(seed)
        return loss_of(x_hat, gate_l1, gen) + (via_gate * torch.randn(via_gate.shape, generator=gen)).sum()

    out = gated_sae_forward(x, W_enc, b_gate, W_dec, b_dec, b_mag, r_mag, product, candidates)
    loss(out.x_hat, out.via_gate, out.gate_l1).backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    shared = (x - b_dec) @ W_enc.T
    gate, mag = shared + b_gate, shared * r_mag.exp() + b_mag
    f = (gate > 0) * mag.relu()
    x_hat = f @ W_dec + b_dec
    via_gate = gate.relu() @ W_dec.detach() + b_dec.detach()
    loss(x_hat, via_gate, gate.relu().sum(-1)).backward()
    want = [p.grad.clone() for p in params]

    assert 0.05 < float(candidates.float().mean()) < 0.5 and bool(((gate > 0) & (mag <= 0)).any())
    torch.testing.assert_close(out.x_hat, x_hat.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.via_gate, via_gate.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.l0, (f > 0).sum(-1).float()) and torch.equal(out.fired, (f > 0).any(0))
    for name, a, b in zip(["x", "W_enc", "b_gate", "W_dec", "b_dec", "b_mag", "r_mag"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()), msg=name)


def test_gated_coder_sparse_and_dense_steps_agree(monkeypatch):
    def make_coder():
        coder = GatedCoder(16, 128, k=8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # a magnitude path unlike the gate's
            coder.r_mag.copy_(0.3 * torch.randn(128, generator=torch.Generator().manual_seed(14)))
        return coder

    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(13)) * 4
    assert_sparse_and_dense_steps_agree(monkeypatch, make_coder, x)
