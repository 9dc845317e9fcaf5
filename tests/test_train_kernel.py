"""The sparse training kernel and the architectures' losses against plain dense autograd."""

from __future__ import annotations

import pytest
import torch

from routesae.train.config import SAEConfig
from routesae.train.saes import build_sae
from routesae.train.sparse_ops import topk_sae_forward


def dense_topk(x, W_enc, b_enc, W_dec, b_dec, k, dead=None, k_aux=0, compute_dtype=torch.float32):
    """The textbook TopK SAE: dense pre-activations, top-k, ReLU, scatter, dense decode."""
    pre = ((x - b_dec).to(compute_dtype) @ W_enc.to(compute_dtype).T + b_enc.to(compute_dtype)).float()
    vals, idx = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    x_hat = z @ W_dec + b_dec
    aux_hat = None
    if dead is not None:
        ids = dead.nonzero().squeeze(1)
        av, ai = pre[:, ids].topk(min(k_aux, ids.numel()), dim=1)
        aux_hat = torch.zeros_like(pre).scatter(1, ids[ai], av.relu()) @ W_dec
    return x_hat, aux_hat


@pytest.mark.parametrize("m,k", [(4608, 32), (512, 16), (40, 5), (4096, 1)])
def test_select_topk_equals_torch_topk(m, k):
    from routesae.train.sparse_ops import select_topk

    pre = torch.randn(300, m, generator=torch.Generator().manual_seed(m)) + 0.5
    values, indices = select_topk(pre, k)
    want_v, want_i = pre.topk(k, dim=1)
    assert torch.equal(values.sort(1).values, want_v.relu().sort(1).values)
    assert torch.equal(indices.sort(1).values, want_i.sort(1).values)
    # and on bf16 (ties possible): the kept values are a valid top k
    pb = pre.bfloat16()
    values, indices = select_topk(pb, k)
    assert torch.equal(values.sort(1).values, pb.topk(k, dim=1).values.float().relu().sort(1).values)
    assert torch.equal(pb.gather(1, indices).float().relu(), values)


def params(m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(m, d, generator=g).requires_grad_(),
        (0.1 * torch.randn(m, generator=g)).requires_grad_(),
        torch.randn(m, d, generator=g).requires_grad_(),
        (0.1 * torch.randn(d, generator=g)).requires_grad_(),
    ]


@pytest.mark.parametrize("with_aux", [False, True])
def test_sparse_kernel_matches_dense_forward_and_all_gradients(with_aux):
    n, d, m, k = 96, 12, 256, 5  # m // 8 >= 4k: the grouped top-k path
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g).requires_grad_()
    P = params(m, d)
    dead = (torch.arange(m) % 3 == 0) if with_aux else None
    grad_out = torch.randn(n, d, generator=g)
    grad_aux = torch.randn(n, d, generator=g)

    out = topk_sae_forward(x, *P, k=k, dead=dead, k_aux=6)
    loss = (out.x_hat * grad_out).sum() + ((out.aux_hat * grad_aux).sum() if with_aux else 0)
    got = torch.autograd.grad(loss, [x, *P])

    x_hat, aux_hat = dense_topk(x, *P, k, dead, 6)
    torch.testing.assert_close(out.x_hat, x_hat, atol=1e-5, rtol=1e-5)
    if with_aux:
        torch.testing.assert_close(out.aux_hat, aux_hat, atol=1e-5, rtol=1e-5)
    loss = (x_hat * grad_out).sum() + ((aux_hat * grad_aux).sum() if with_aux else 0)
    want = torch.autograd.grad(loss, [x, *P])
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")
        assert b.abs().sum() > 0, name  # the comparison is not between two zero tensors


def test_bf16_kernel_selects_a_top_k_and_decodes_in_fp32():
    n, d, m, k = 64, 32, 128, 8
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    P = [p.detach() for p in params(m, d, seed=3)]
    W_enc, b_enc, W_dec, b_dec = P
    out = topk_sae_forward(x, *P, k=k, compute_dtype=torch.bfloat16)
    pre = (x - b_dec) @ W_enc.T + b_enc  # fp32 truth
    # the kept latents are a top-k of the exact pre-activations, up to bf16 rounding
    kept = pre.gather(1, out.indices)
    dropped = pre.scatter(1, out.indices, float("-inf"))
    tol = 0.02 * pre.abs().amax(1, keepdim=True)
    assert (kept.amin(1, keepdim=True) >= dropped.amax(1, keepdim=True) - tol).all()
    torch.testing.assert_close(out.values, kept.relu(), atol=float(tol.max()), rtol=0.02)
    # the decode is fp32: exactly z @ W_dec + b_dec for the z the kernel chose
    z = torch.zeros(n, m).scatter(1, out.indices, out.values)
    assert out.x_hat.dtype == torch.float32
    torch.testing.assert_close(out.x_hat, z @ W_dec + b_dec, atol=1e-5, rtol=1e-5)


def reference_routesae_loss(sae, x_layers):
    """RouteSAE's hard-routed NormMSE written out with plain dense ops, sharing the SAE's parameters."""
    x = x_layers.float()
    mean = x.mean(-1, keepdim=True)
    std = x.var(-1, keepdim=True, unbiased=False).sqrt() + 1e-6
    xn = (x - mean) / std
    probs = torch.softmax(xn.sum(1) @ sae.router.weight.T, dim=-1)
    p, i = probs.max(-1)
    inp = p[:, None] * xn[torch.arange(x.shape[0]), i]
    c = sae.coder
    x_hat, _ = dense_topk(inp, c.W_enc, c.b_enc, c.W_dec, c.b_dec, c.k)
    return ((x_hat - inp).pow(2).sum(-1) / inp.pow(2).sum(-1)).mean()


def test_router_receives_the_gradient_of_the_reference_loss():
    cfg = SAEConfig(arch="routesae", d_model=16, n_latents=48, k=4, layers=[2, 3, 4])
    sae = build_sae(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(200, 3, 16, generator=torch.Generator().manual_seed(5)) * 4 + 1
    out = sae.training_loss(x, torch.float32)
    got = torch.autograd.grad(out.loss, [sae.router.weight, *sae.coder.parameters()])
    ref = reference_routesae_loss(sae, x)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    want = torch.autograd.grad(ref, [sae.router.weight, *sae.coder.parameters()])
    assert want[0].abs().sum() > 0 and torch.isfinite(got[0]).all()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert out.extra["route_share"].sum().item() == pytest.approx(1.0)


def test_topk_training_loss_is_normalized_mse_of_normalized_input():
    cfg = SAEConfig(arch="topk", d_model=16, n_latents=48, k=4, layers=[3])
    sae = build_sae(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(50, 16) * 7 + 3
    out = sae.training_loss(x.bfloat16(), torch.float32)
    xn = sae.coder_input(x.bfloat16())
    x_hat = sae.decode(sae.encode(x.bfloat16()))
    want = ((x_hat - xn).pow(2).sum(-1) / xn.pow(2).sum(-1)).mean()
    torch.testing.assert_close(out.nmse, want, atol=1e-5, rtol=1e-5)
    assert out.l0.item() <= 4 and out.fired.sum() >= 1


def test_decoder_constraint_keeps_unit_rows_and_removes_parallel_gradient():
    cfg = SAEConfig(arch="topk", d_model=8, n_latents=20, k=3, layers=[1])
    sae = build_sae(cfg, torch.Generator().manual_seed(0))
    c = sae.coder
    torch.testing.assert_close(c.W_dec.norm(dim=1), torch.ones(20))
    torch.testing.assert_close(c.W_dec, c.W_enc)  # W_dec starts as the encoder's transpose (row layout)
    sae.training_loss(torch.randn(64, 8), torch.float32).loss.backward()
    c.constrain_grad_()
    torch.testing.assert_close((c.W_dec.grad * c.W_dec).sum(1), torch.zeros(20), atol=1e-6, rtol=0)
    with torch.no_grad():
        c.W_dec.mul_(3)
    c.constrain_weights_()
    torch.testing.assert_close(c.W_dec.norm(dim=1), torch.ones(20))


@pytest.mark.parametrize("prefixes", [(), (8, 24)])
def test_batch_topk_and_matryoshka_kernel_gradients_equal_dense_autograd(prefixes):
    """BatchTopK's batch-wide selection and Matryoshka's nested decodes through the sparse kernel,
    against the same losses written densely (the same selection, as a dense mask)."""
    g = torch.Generator().manual_seed(11)
    n, d, m, k = 50, 12, 40, 3
    x = torch.randn(n, d, generator=g)
    leaves = [torch.randn(m, d, generator=g), torch.randn(m, generator=g) * 0.1, torch.randn(m, d, generator=g),
              torch.randn(d, generator=g) * 0.1]
    ours = [t.clone().requires_grad_(True) for t in leaves]
    ref = [t.clone().requires_grad_(True) for t in leaves]

    out = topk_sae_forward(x, *ours, k, batch=True, prefixes=prefixes)
    loss = (out.x_hat - x).pow(2).sum()
    if prefixes:
        loss = loss + (out.prefix_hat - x).pow(2).sum()
    loss.backward()

    W_enc, b_enc, W_dec, b_dec = ref
    pre = (x - b_dec) @ W_enc.T + b_enc
    keep = torch.zeros(n * m, dtype=torch.bool)
    keep[pre.detach().reshape(-1).topk(k * n).indices] = True
    z = pre.relu() * keep.view(n, m)
    want = (z @ W_dec + b_dec - x).pow(2).sum()
    for boundary in prefixes:
        want = want + (z[:, :boundary] @ W_dec[:boundary] + b_dec - x).pow(2).sum()
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-4)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_sync_free_counts_and_fired_mask_match_torchs_own():
    """index_counts and fired_latents (scatters: no host read-back on CUDA) against bincount and a
    boolean-mask write, including latents never hit and an all-inactive row."""
    from routesae.train.sparse_ops import fired_latents, index_counts

    gen = torch.Generator().manual_seed(3)
    flat = torch.randint(0, 90, (5000,), generator=gen)
    assert torch.equal(index_counts(flat, 100), torch.bincount(flat, minlength=100))
    indices = torch.randint(0, 90, (64, 16), generator=gen)
    active = torch.rand(64, 16, generator=gen) > 0.7
    active[0] = False
    want = torch.zeros(100, dtype=torch.bool)
    want[indices[active]] = True
    got = fired_latents(indices, active, 100)
    assert got.dtype == torch.bool and torch.equal(got, want) and not got[90:].any()
