"""Eval's pure metrics against independent float64 numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from routesae.evaluate.metrics import (
    VarianceAccumulator,
    ce_from_logits,
    ce_per_position,
    expm1_,
    kl_from_logits,
    logit_stats,
    fvu,
    kl_per_position,
    log_probs,
    loss_recovered,
    normmse_per_token,
)


def _np_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_kl_and_ce_equal_a_numpy_computation_from_two_logit_tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 300, generator=g) * 3
    b = a + torch.randn(37, 300, generator=g)
    targets = torch.randint(0, 300, (37,), generator=g)
    pa, pb = _np_softmax(a.double().numpy()), _np_softmax(b.double().numpy())
    want_kl = (pa * (np.log(pa) - np.log(pb))).sum(-1)
    want_ce = -np.log(pb[np.arange(37), targets.numpy()])
    got_kl = kl_per_position(log_probs(a), log_probs(b)).numpy()
    got_ce = ce_per_position(log_probs(b), targets).numpy()
    np.testing.assert_allclose(got_kl, want_kl, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_ce, want_ce, rtol=1e-5, atol=1e-5)
    # and torch's own reference implementations agree
    ref = torch.nn.functional.kl_div(log_probs(b), log_probs(a), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_per_position(log_probs(a), log_probs(b)), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ce_per_position(log_probs(b), targets),
                               torch.nn.functional.cross_entropy(b, targets, reduction="none"))


def test_fast_expm1_is_as_precise_as_float32_allows_and_keeps_the_edge_cases():
    g = torch.Generator().manual_seed(4)
    for scale in (1e-6, 1e-3, 0.3, 5.0):
        d = torch.randn(8, 4096, generator=g) * scale
        want = np.expm1(d.double().numpy())
        got = expm1_(d.clone(), torch.empty_like(d), torch.empty_like(d)).double().numpy()
        np.testing.assert_allclose(got, want, rtol=5e-7)
        # plain exp(d) - 1 is not (this is why the form exists)
        if scale <= 1e-3:
            assert np.abs((torch.exp(d).double().numpy() - 1 - want) / want).max() > 1e-3
    d = torch.tensor([0.0, -0.0, -80.0, -200.0, -math.inf, 100.0, math.inf])
    got = expm1_(d.clone(), torch.empty_like(d), torch.empty_like(d))
    assert got[0] == 0 and got[1] == 0  # exactly
    assert got[2] == -1 and got[3] == -1 and got[4] == -1
    assert not torch.isfinite(got[5:]).any()  # overflow is never a wrong finite number


def test_log_sum_exp_read_off_the_softmax_equals_float64():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(16, 49152, generator=g) * 3
    z[0, 7] += 30.0  # a confident row
    z[1, :100] = -math.inf  # masked tokens
    want = torch.logsumexp(z.double(), -1)
    stats = logit_stats(z, with_probs=True)
    torch.testing.assert_close(stats.lse.double(), want, rtol=0, atol=5e-6)
    torch.testing.assert_close(stats.probs.double(), torch.softmax(z.double(), -1), rtol=1e-5, atol=1e-9)
    assert logit_stats(z).probs is None


def test_one_pass_kl_and_ce_from_raw_logits_equal_numpy():
    # the engine's form, sum p_ref (z_ref - z) - (lse_ref - lse), against the textbook one
    g = torch.Generator().manual_seed(2)
    a = torch.randn(64, 2000, generator=g) * 4
    for scale in (1.0, 1e-2, 1e-4):  # large and tiny KLs
        b = a + scale * torch.randn(64, 2000, generator=g)
        targets = torch.randint(0, 2000, (64,), generator=g)
        pa, pb = _np_softmax(a.double().numpy()), _np_softmax(b.double().numpy())
        want = (pa * (np.log(pa) - np.log(pb))).sum(-1)
        ref = logit_stats(a, with_probs=True)
        got, lse = kl_from_logits(a, ref, b)
        np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-3, atol=1e-9)
        torch.testing.assert_close(lse, logit_stats(b).lse)
        torch.testing.assert_close(lse, torch.logsumexp(b, -1))
        np.testing.assert_allclose(ce_from_logits(b, lse, targets).numpy(),
                                   -np.log(pb[np.arange(64), targets.numpy()]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref.probs.double().numpy(), pa, rtol=1e-4, atol=1e-9)
    assert kl_from_logits(a, ref, a.clone())[0].abs().max() == 0
    # far-apart distributions (exp overflow in the one-pass form) fall back to the direct form
    far = a.clone()
    far[:, 0] += 200.0
    kl_far, lse_far = kl_from_logits(a, ref, far)
    torch.testing.assert_close(kl_far, kl_per_position(log_probs(a), log_probs(far)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse_far, torch.logsumexp(far, -1))
    # a token deep in float32's underflow under the reference (p_ref denormal) that rises by 85
    # nats: still right
    low = torch.randn(8, 2000, generator=g)
    low[:, 0] = -80.0
    high = low.clone()
    high[:, 0] = 5.0  # a rise of 85 nats: expm1 stays finite, the mass moves to token 0
    ref_low = logit_stats(low, with_probs=True)
    kl_low, lse_high = kl_from_logits(low, ref_low, high)
    pl, ph = _np_softmax(low.double().numpy()), _np_softmax(high.double().numpy())
    with np.errstate(divide="ignore", invalid="ignore"):
        want_low = np.where(pl > 0, pl * (np.log(pl) - np.log(ph)), 0).sum(-1)
    np.testing.assert_allclose(kl_low.double().numpy(), want_low, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lse_high, torch.logsumexp(high, -1))
    # a confident reference whose top token loses almost all its mass, over a real vocabulary's
    # size: 1 + sum p expm1(d) cancels, and the softmax's float32 sum (1 within ~1e-5) would
    # dominate what is left; such rows must still come out right
    peaked = torch.randn(16, 49152, generator=g) * 2
    peaked[:, 0] += 25.0
    drop = peaked.clone()
    drop[:, 0] -= 25.0
    ref_p = logit_stats(peaked, with_probs=True)
    kl_drop, lse_drop = kl_from_logits(peaked, ref_p, drop)
    p_a, p_drop = _np_softmax(peaked.double().numpy()), _np_softmax(drop.double().numpy())
    want_drop = (p_a * (np.log(p_a) - np.log(p_drop))).sum(-1)
    # float32 sums over 49,152 entries are good to about sqrt(n) * eps ~ 1e-5 relative, and which
    # side of 1e-5 depends on the CPU's reduction order (1.2e-5 on an AVX2-only EPYC)
    np.testing.assert_allclose(kl_drop.double().numpy(), want_drop, rtol=5e-5)
    np.testing.assert_allclose(lse_drop.double().numpy(), np.log(np.exp(drop.double().numpy()).sum(-1)), rtol=1e-6)
    # masked vocabulary entries (-inf in both) contribute nothing
    a2, b2 = a.clone(), a + 0.1
    a2[:, :10] = -math.inf
    b2[:, :10] = -math.inf
    ref2 = logit_stats(a2, with_probs=True)
    kl2, _ = kl_from_logits(a2, ref2, b2)
    assert torch.isfinite(kl2).all()
    torch.testing.assert_close(kl2, kl_per_position(log_probs(a2), log_probs(b2)), rtol=1e-3, atol=1e-5)


def test_kl_is_zero_for_identical_and_finite_with_masked_logits():
    a = torch.randn(5, 50)
    assert kl_per_position(log_probs(a), log_probs(a)).abs().max() == 0
    # a zero-probability token under the reference contributes nothing, even if -inf elsewhere
    a[:, 0] = -math.inf
    b = torch.randn(5, 50)
    b[:, 0] = -math.inf
    assert torch.isfinite(kl_per_position(log_probs(a), log_probs(b))).all()


def test_bf16_logits_are_upcast_before_the_softmax():
    a = (torch.randn(4, 1000) * 10).bfloat16()
    assert log_probs(a).dtype == torch.float32
    np.testing.assert_allclose(log_probs(a).exp().sum(-1).numpy(), 1.0, rtol=1e-5)


def test_fvu_and_normmse_equal_numpy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 16, generator=g) * torch.linspace(0.1, 5, 16) + 3
    x_hat = x + 0.3 * torch.randn(500, 16, generator=g)
    xn, hn = x.double().numpy(), x_hat.double().numpy()
    want = np.var(xn - hn, axis=0).sum() / np.var(xn, axis=0).sum()
    assert fvu(x, x_hat) == pytest.approx(want, rel=1e-9)
    want_nmse = (((hn - xn) ** 2).sum(-1) / (xn**2).sum(-1))
    np.testing.assert_allclose(normmse_per_token(x, x_hat).numpy(), want_nmse, rtol=1e-5)
    # streamed in pieces, the accumulator gives the same number
    acc = VarianceAccumulator(16)
    for lo in range(0, 500, 128):
        acc.add(x[lo : lo + 128], x_hat[lo : lo + 128])
    assert acc.fvu() == pytest.approx(want, rel=1e-9)
    assert fvu(x, x) == 0.0


def test_loss_recovered_endpoints():
    assert loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert loss_recovered(2.0, 3.5, 5.0) == pytest.approx(0.5)
    assert math.isnan(loss_recovered(2.0, 2.0, 2.0))
