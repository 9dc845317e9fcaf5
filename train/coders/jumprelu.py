"""JumpReLU SAE (Rajamanoharan et al. 2024b; Gemma Scope): a latent fires only above its own
threshold theta; the L0 penalty and the thresholds train through straight-through estimators with
a rectangle kernel of width `BANDWIDTH`.

Parameterization and defaults, for budgets of a few million tokens: theta is a parameter itself
(float32 whatever the compute dtype; a log-parameterized theta moves too slowly under Adam). Adam
moves it by about the learning rate per step, so a threshold that has to climb from Gemma Scope's
tiny start to where k latents fire (about 2.5 pre-activation spreads for k = 64 of 4608) would not
get there in a thousand steps: the first training batch sets each threshold so that its latent
fires on k / n_latents of the tokens (`StartsAtTargetL0`), and training refines them. The kernel's width
`BANDWIDTH` is in the normalized space's units, where a pre-activation spreads over about 1 at
initialization (unit encoder rows, inputs of norm sqrt(d)): Gemma Scope's 0.001 at E||x||^2 = 1,
scaled to our inputs and widened, as a kernel as narrow as theirs gives the thresholds a gradient
from too few tokens for such a budget.

Training runs the sparse step of sparse_threshold.py (only the encoder's matmul dense) while few
pre-activations lie near or above their thresholds, as they do once the thresholds sit at the
target L0 (`sparse_threshold.SPARSE_UP_TO`), and a dense step otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routesae.train.coders.base import (
    Coder,
    CoderOutput,
    StartsAtTargetL0,
    UnitNormDecoder,
    dense_decode,
    dense_encode,
    jump,
    per_input_norm,
    unit_rows,
)
from routesae.train.distributed import token_mean
from routesae.train.sparse_threshold import candidate_mask, encoder_product, jumprelu_sae_forward, sparse_pays

THRESHOLD_FLOOR = 1e-3
"""Smallest threshold (at initialization and after every step): theta > 0 keeps f a rectified code."""
THRESHOLD_LR_SCALE = 10.0
"""The thresholds' learning rate as a multiple of the rest's: Adam moves a parameter by about its
learning rate per step however strong the L0 penalty, and the pre-activations' scale drifts as the
encoder learns, so thresholds moving as slowly as the weights let L0 escape its target."""
BANDWIDTH = 0.2
"""Width eps of the rectangle kernel K(u) = 1[|u| < 1/2] of the straight-through estimators."""


class JumpReLUWithL0(torch.autograd.Function):
    """f = pre * 1[pre > theta] and its L0 count l0 = sum_j 1[pre_j > theta_j] in one function, so
    the mask is built once in the forward and the kernel's window once in the backward (the textbook
    form, a JumpReLU and a step function, builds each twice).
    Forward: f in `out_dtype` (the decoder's matmul dtype, written straight from float32 pre), l0 [n]
    and the mask (no gradient). Gradients: to pre through the hard mask, from f only; to theta the
    straight-through ones, d f / d theta = -theta * K((pre - theta) / eps) / eps and
    d l0 / d theta = -K((pre - theta) / eps) / eps, with K(u) = 1[|u| < 1/2]."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float, out_dtype: torch.dtype):
        mask = pre > theta
        f = torch.mul(pre, mask, out=torch.empty_like(pre, dtype=out_dtype))
        l0 = torch.count_nonzero(mask, dim=-1).to(pre.dtype)
        ctx.save_for_backward(pre, theta, mask)
        ctx.eps = eps
        ctx.mark_non_differentiable(mask)
        return f, l0, mask

    @staticmethod
    def backward(ctx, grad_f: Tensor, grad_l0: Tensor, _grad_mask):
        pre, theta, mask = ctx.saved_tensors
        eps = ctx.eps
        grad_pre = torch.mul(grad_f, mask, out=torch.empty_like(pre))
        window = (pre > theta - eps / 2).logical_and_(pre < theta + eps / 2)  # K((pre - theta) / eps)
        from_f = (grad_f * window).sum(0, dtype=theta.dtype)
        from_l0 = grad_l0.to(theta.dtype) @ window.to(theta.dtype)
        return grad_pre, -(theta * from_f + from_l0) / eps, None, None


class JumpReLUCoder(StartsAtTargetL0, UnitNormDecoder, Coder):
    """pre = W_enc (x - b_dec) + b_enc; f = pre * 1[pre > theta]; x_hat = W_dec f + b_dec; unit-norm
    decoder rows. Penalty, with a target L0 of k: lambda * (mean L0 / k - 1)^2 (dictionary_learning's
    form: it pulls the thresholds down when too few latents fire, where lambda * L0 can only push
    them up; on the demo store the latter ended at L0 23 for a target of 32 even as its steered
    lambda fell to 0.3, the former at 32); without k, Gemma Scope's lambda * L0 in NormMSE units."""

    name = "jumprelu"
    has_penalty = True
    default_sparsity_coef = 1.0  # a 10% miss of the target costs 0.01, a NormMSE-sized amount
    targets_l0_itself = True

    def __init__(self, d_model: int, n_latents: int, k: int = 0, generator: torch.Generator | None = None,
                 bandwidth: float | None = None):
        super().__init__(d_model, n_latents)
        rows = unit_rows(n_latents, d_model, generator)
        self.W_enc = nn.Parameter(rows.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(rows)
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.threshold = nn.Parameter(torch.full((n_latents,), THRESHOLD_FLOOR, dtype=torch.float32))
        """[n_latents] theta, float32 always (a bf16 threshold stops learning)."""
        self.bandwidth = BANDWIDTH if bandwidth is None else bandwidth
        self._init_start(k, n_latents)

    def _place(self, quantile: Tensor) -> None:
        self.threshold.copy_(quantile.clamp_min(THRESHOLD_FLOOR))

    def encode(self, x: Tensor) -> Tensor:
        return jump(torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T), self.threshold)

    def forward_train(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, k_aux: int = 0,
        sparsity_coef: float = 0.0,
    ) -> CoderOutput:
        product = encoder_product(x, self.W_enc, self.b_dec, compute_dtype)
        self.start_from(lambda: product.float() + self.b_enc)
        theta = self.threshold.float()
        candidates = candidate_mask(product, self.b_enc.detach(), theta.detach() - self.bandwidth / 2)
        fired = active = None
        if sparse_pays(candidates):
            x_hat, l0, fired, _ = jumprelu_sae_forward(
                x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, theta, self.bandwidth, product, candidates)
        else:  # thresholds still low: the dense step
            del product, candidates
            pre = dense_encode(x - self.b_dec, self.W_enc, self.b_enc, compute_dtype)
            f, l0, active = JumpReLUWithL0.apply(pre, theta, self.bandwidth, compute_dtype)
            x_hat = dense_decode(f, self.W_dec, self.b_dec, compute_dtype)
        if self.target_fraction > 0:  # toward the target L0 from either side (dictionary_learning's form)
            # the whole batch's mean L0 under a distributed fit: the penalty is not linear in it
            penalty = sparsity_coef * (token_mean(l0) / (self.target_fraction * self.n_latents) - 1).square()
        else:
            penalty = sparsity_coef * per_input_norm(l0, x)
        return CoderOutput(x_hat, None, None, None, penalty, active, l0, fired)

    def lr_scales(self) -> list[tuple[nn.Parameter, float]]:
        return [(self.threshold, THRESHOLD_LR_SCALE)]

    @torch.no_grad()
    def constrain_weights_(self) -> None:
        """Unit-norm decoder rows; thresholds kept positive (a negative one would let negative
        pre-activations through, which the ReLU of the definition forbids)."""
        super().constrain_weights_()
        self.threshold.clamp_(min=THRESHOLD_FLOOR)

    def export_tensors(self) -> dict[str, Tensor]:
        """SAELens's JumpReLU names: W_enc [d_in, d_sae], b_enc, threshold, W_dec [d_sae, d_in], b_dec."""
        return {**super().export_tensors(), "threshold": self.threshold.detach().clone()}
