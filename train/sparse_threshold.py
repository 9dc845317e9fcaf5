"""Training steps of the coders whose code is cut at a per-latent threshold (JumpReLU at theta,
ReLU + L1 at 0, gated at its gate's 0) as autograd functions with sparse backwards: the TopK
kernel's counterpart (sparse_ops.py) for SAEs without a k.

Their gradients live on few entries of the [n, n_latents] pre-activations: to pre where a latent
fires, and for JumpReLU to theta inside the straight-through kernel's window
|pre - theta| < eps / 2 (gated: where its gate opens, for both of its paths). All lie among the
candidates pre > floor (0 for ReLU and gated's gate, theta - eps / 2 for JumpReLU), one or two
percent of the entries at the L0 an SAE is trained at. So only the
encoder's matmul is dense: the candidates are picked from its product in one comparison, and the
decode, the decoder's, encoder's and thresholds' gradients are built from them alone, with the
TopK kernel's sparse products. The pre-activations are the dense step's ((x - b_dec) W_enc^T in
the compute dtype, then b_enc added in float32), so the same latents fire; the decode runs in
float32 (the dense step's in the compute dtype).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from routesae.train.sparse_ops import TransposedPattern, fired_latents, pack_rows, sampled_rowdot, sparse_decode

_SAFETY = 2.0**-7
"""Relative margin under which the candidates' floor is taken in the product's dtype: bf16 rounds
by at most 2^-8 of a value, so every entry whose float32 pre-activation clears the floor clears
the rounded one too."""


SPARSE_UP_TO = 1 / 16
"""The coders run a sparse step while at most this share of the pre-activations are candidates;
past it (thresholds or biases still low) the dense step is the faster: JumpReLU's step at the
fit bench's shape crosses over between 6% and 8% on this project's CPU (bench/fit.py)."""


class ThresholdForward(NamedTuple):
    """What one training forward of a sparse threshold step returns."""

    x_hat: Tensor
    """[n, d] reconstruction (decoder bias included), float32."""
    l0: Tensor
    """[n] latents firing per token, float32 (JumpReLU: its gradient reaches the thresholds
    through the step function's straight-through estimator; ReLU: no gradient)."""
    fired: Tensor
    """[n_latents] bool: latents that fired on at least one token (no gradient)."""
    weighted_l1: Tensor | None = None
    """[n] ReLU's sum_i f_i w_i per token (w: the latents' L1 weights), or None."""


def candidate_mask(product: Tensor, b_enc: Tensor, floor: Tensor) -> Tensor:
    """[n, n_latents] bool, a superset of the entries with product + b_enc > floor (all that a step
    needs), compared in the product's own dtype (a float32 copy of a bf16 product would cost more
    than the comparison)."""
    cut = floor - b_enc - _SAFETY * (floor.abs() + b_enc.abs())
    return product > cut.to(product.dtype)


@torch.no_grad()
def encoder_product(x: Tensor, W_enc: Tensor, b_dec: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """(x - b_dec) W_enc^T [n, n_latents] in the compute dtype, without gradient (the sparse steps
    build the encoder's gradients themselves)."""
    return (x - b_dec).to(compute_dtype) @ W_enc.to(compute_dtype).T


def sparse_pays(candidates: Tensor) -> bool:
    """Whether few enough entries are candidates for the sparse step to beat the dense one."""
    return int(torch.count_nonzero(candidates)) <= SPARSE_UP_TO * candidates.numel()


def _candidates(product: Tensor, candidates: Tensor, b_enc: Tensor, with_product: bool = False):
    """-> pre [n, c] float32 at each token's candidates (-inf in free slots: they neither fire nor
    fall in a window) and their latent indices [n, c]; with_product, also the product itself there
    [n, c] float32 (0 in free slots)."""
    rows, cols = candidates.nonzero(as_tuple=True)  # row-major: rows come sorted
    at = product[rows, cols].float()
    pre, indices = pack_rows(rows, cols, at + b_enc[cols], product.shape[0], float("-inf"))
    if not with_product:
        return pre, indices
    return pre, indices, pack_rows(rows, cols, at, product.shape[0], 0.0)[0]


def _dictionary_grads(ctx, grad_x_hat: Tensor, values: Tensor, grad_pre: Tensor, indices: Tensor,
                      x: Tensor, b_dec: Tensor, W_enc: Tensor, W_dec: Tensor):
    """Gradients of x, W_enc, b_enc, W_dec, b_dec from the decode's output gradient and the
    pre-activations' gradient at the candidates (the sparse products of sparse_ops)."""
    pattern = TransposedPattern.of(indices, W_enc.shape[0])
    grad_b_enc = torch.zeros(W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device)
    grad_b_enc.index_add_(0, indices.reshape(-1), grad_pre.reshape(-1))
    grad_W_dec = pattern.matmul(values, grad_x_hat)
    grad_W_enc = pattern.matmul(grad_pre, x - b_dec) if ctx.needs_input_grad[1] else None
    grad_x = sparse_decode(grad_pre, indices, W_enc) if ctx.needs_input_grad[0] else None
    # as for TopK: b_dec is added to the output and taken from the encoder's input
    grad_b_dec = grad_x_hat.sum(0) - grad_b_enc @ W_enc
    return grad_x, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec


class _JumpReLUSAEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, theta, product, candidates, eps):
        pre, indices = _candidates(product, candidates, b_enc)
        active = pre > theta[indices]
        values = torch.where(active, pre, 0.0)
        x_hat = sparse_decode(values, indices, W_dec) + b_dec
        fired = fired_latents(indices, active, W_enc.shape[0])
        ctx.eps = eps
        ctx.save_for_backward(x, b_dec, W_enc, W_dec, theta, pre, indices, active, values)
        ctx.mark_non_differentiable(fired)
        return x_hat, active.sum(-1, dtype=torch.float32), fired

    @staticmethod
    def backward(ctx, grad_x_hat, grad_l0, _grad_fired):
        x, b_dec, W_enc, W_dec, theta, pre, indices, active, values = ctx.saved_tensors
        grad_x_hat = grad_x_hat.contiguous()
        grad_values = sampled_rowdot(indices, grad_x_hat, W_dec)  # d loss / d f at every candidate
        grad_pre = grad_values * active  # f = pre * 1[pre > theta]: through the hard mask
        grads = _dictionary_grads(ctx, grad_x_hat, values, grad_pre, indices, x, b_dec, W_enc, W_dec)
        # straight-through, inside the window: d f / d theta = -theta / eps, d l0 / d theta = -1 / eps
        theta_at = theta[indices]
        window = (pre - theta_at).abs() < ctx.eps / 2
        per_entry = (theta_at * grad_values + grad_l0[:, None])[window]
        grad_theta = torch.zeros_like(theta).index_add_(0, indices[window], per_entry).div_(-ctx.eps)
        return *grads, grad_theta, None, None, None


class _ReLUSAEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, l1_weights, product, candidates):
        pre, indices = _candidates(product, candidates, b_enc)
        values = pre.clamp_min(0.0)  # the margin's extra candidates (pre <= 0) and free slots give 0
        active = values > 0
        x_hat = sparse_decode(values, indices, W_dec) + b_dec
        weighted_l1 = (values * l1_weights[indices]).sum(-1)
        fired = fired_latents(indices, active, W_enc.shape[0])
        l0 = active.sum(-1, dtype=torch.float32)
        ctx.save_for_backward(x, b_dec, W_enc, W_dec, l1_weights, indices, active, values)
        ctx.mark_non_differentiable(l0, fired)
        return x_hat, l0, fired, weighted_l1

    @staticmethod
    def backward(ctx, grad_x_hat, _grad_l0, _grad_fired, grad_l1):
        x, b_dec, W_enc, W_dec, l1_weights, indices, active, values = ctx.saved_tensors
        grad_x_hat = grad_x_hat.contiguous()
        weights_at = l1_weights[indices]
        grad_values = sampled_rowdot(indices, grad_x_hat, W_dec) + grad_l1[:, None] * weights_at
        grad_pre = grad_values * active  # the ReLU's derivative
        grads = _dictionary_grads(ctx, grad_x_hat, values, grad_pre, indices, x, b_dec, W_enc, W_dec)
        grad_weights = torch.zeros_like(l1_weights).index_add_(
            0, indices.reshape(-1), (values * grad_l1[:, None]).reshape(-1))
        return *grads, grad_weights, None, None


class _GatedSAEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_gate, W_dec, b_dec, b_mag, r_mag, product, candidates):
        # shared: (x - b_dec) W_enc^T at the candidates, as the dense step has it; 0 in free slots
        # (-inf there would make NaN gradients)
        gate, indices, shared = _candidates(product, candidates, b_gate, with_product=True)
        scale = r_mag.exp()
        mag = shared * scale[indices] + b_mag[indices]
        opens = gate > 0
        active = opens & (mag > 0)
        values = torch.where(active, mag, 0.0)  # f = 1[pi_gate > 0] ReLU(pi_mag)
        gate_values = gate.clamp_min(0.0)  # ReLU(pi_gate), the L1's and the gate path's code
        x_hat = sparse_decode(values, indices, W_dec) + b_dec
        via_gate = sparse_decode(gate_values, indices, W_dec) + b_dec  # no gradient to W_dec, b_dec
        l0 = active.sum(-1, dtype=torch.float32)
        fired = fired_latents(indices, active, W_enc.shape[0])
        ctx.save_for_backward(x, b_dec, W_enc, W_dec, scale, indices, shared, opens, active, values)
        ctx.mark_non_differentiable(l0, fired)
        return x_hat, via_gate, gate_values.sum(-1), l0, fired

    @staticmethod
    def backward(ctx, grad_x_hat, grad_via, grad_l1, _grad_l0, _grad_fired):
        x, b_dec, W_enc, W_dec, scale, indices, shared, opens, active, values = ctx.saved_tensors
        grad_x_hat = grad_x_hat.contiguous()
        grad_gate = (sampled_rowdot(indices, grad_via.contiguous(), W_dec) + grad_l1[:, None]) * opens
        grad_mag = sampled_rowdot(indices, grad_x_hat, W_dec) * active
        scale_at = scale[indices]
        grad_shared = grad_gate + grad_mag * scale_at
        # the dictionary's gradients from the shared product's (its "b_enc" is the sum over tokens,
        # which b_dec's gradient needs); the gate path's decode gives W_dec and b_dec none
        grad_x, grad_W_enc, _, grad_W_dec, grad_b_dec = _dictionary_grads(
            ctx, grad_x_hat, values, grad_shared, indices, x, b_dec, W_enc, W_dec)
        flat = indices.reshape(-1)

        def per_latent(per_entry: Tensor) -> Tensor:
            return torch.zeros_like(scale).index_add_(0, flat, per_entry.reshape(-1))

        grad_r_mag = per_latent(grad_mag * shared * scale_at)
        return (grad_x, grad_W_enc, per_latent(grad_gate), grad_W_dec, grad_b_dec, per_latent(grad_mag),
                grad_r_mag, None, None)


def jumprelu_sae_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, theta: Tensor, eps: float,
    product: Tensor, candidates: Tensor,
) -> ThresholdForward:
    """Training forward of a JumpReLU SAE, f = pre * 1[pre > theta], with a sparse backward.
    x: [n, d] float32 input in the SAE's space; W_enc, W_dec: [n_latents, d]; theta: [n_latents]
    float32 thresholds; eps: the rectangle kernel's width; product: (x - b_dec) W_enc^T
    [n, n_latents] in the compute dtype, computed without gradient; candidates: its
    `candidate_mask` at floor theta - eps / 2."""
    return ThresholdForward(*_JumpReLUSAEFunction.apply(
        x, W_enc, b_enc, W_dec, b_dec, theta, product, candidates, eps))


def relu_sae_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, l1_weights: Tensor,
    product: Tensor, candidates: Tensor,
) -> ThresholdForward:
    """Training forward of a ReLU SAE, f = ReLU(pre), with a sparse backward, and its per-token
    L1 sum_i f_i w_i with weights l1_weights [n_latents] (differentiable: the decoder norms of the
    April-2024 form). Arguments as for `jumprelu_sae_forward`, candidates at floor 0."""
    return ThresholdForward(*_ReLUSAEFunction.apply(
        x, W_enc, b_enc, W_dec, b_dec, l1_weights, product, candidates))


class GatedForward(NamedTuple):
    """What one training forward of the sparse gated step returns."""

    x_hat: Tensor
    """[n, d] reconstruction (decoder bias included), float32."""
    via_gate: Tensor
    """[n, d] the gate path's reconstruction W_dec ReLU(pi_gate) + b_dec (gradient only to the encoder side)."""
    gate_l1: Tensor
    """[n] sum_i ReLU(pi_gate)_i per token."""
    l0: Tensor
    """[n] latents firing per token (no gradient)."""
    fired: Tensor
    """[n_latents] bool: latents that fired on at least one token (no gradient)."""


def gated_sae_forward(
    x: Tensor, W_enc: Tensor, b_gate: Tensor, W_dec: Tensor, b_dec: Tensor, b_mag: Tensor, r_mag: Tensor,
    product: Tensor, candidates: Tensor,
) -> GatedForward:
    """Training forward of a gated SAE with a sparse backward: pi_gate = product + b_gate,
    pi_mag = exp(r_mag) product + b_mag, f = 1[pi_gate > 0] ReLU(pi_mag). candidates: the
    `candidate_mask` of product with bias b_gate at floor 0 (where the gate opens)."""
    return GatedForward(*_GatedSAEFunction.apply(
        x, W_enc, b_gate, W_dec, b_dec, b_mag, r_mag, product, candidates))
