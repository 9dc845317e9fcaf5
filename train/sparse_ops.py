"""The TopK SAE's training step as one autograd function whose backward touches only the k chosen
latents per token.

Only the encoder's forward matmul is dense ([n, d] @ [d, n_latents], run in the compute dtype,
bf16 where the hardware has it). Everything after the top-k is sparse: the decode is a CSR
matrix of the kept activations times W_dec, and the backward builds the encoder and decoder
gradients from the same CSR pattern (sampled dense-dense products and transposed sparse-dense
products) instead of the three dense [n, n_latents] matmuls a plain autograd step runs.
On this project's CPU that makes a step about twice as fast as the dense one (bench/fit.py).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from routesae.train.distributed import current_shard, global_topk


def _csr_tensor(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR tensor without torch's "beta" warning. Invariant checks are off: the patterns here
    come from top-k indices and are valid by construction."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class SparseForward(NamedTuple):
    """What one training forward of the TopK dictionary returns."""

    x_hat: Tensor
    """[n, d] reconstruction in the SAE's input space (decoder bias included), float32."""
    values: Tensor
    """[n, k] activations of the kept latents after the ReLU, float32 (no gradient)."""
    indices: Tensor
    """[n, k] their latent indices, int64."""
    aux_hat: Tensor | None
    """[n, d] reconstruction from the top-k_aux dead latents (no decoder bias), or None."""
    prefix_hat: Tensor | None = None
    """[len(prefixes), n, d] reconstructions from the kept latents below each prefix boundary
    (decoder bias included; Matryoshka), or None."""


def _csr(indices: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """[n, c] indices/values, one row per token -> CSR matrix [n, n_cols]."""
    n, c = indices.shape
    crow = torch.arange(0, n * c + 1, c, device=indices.device)
    return _csr_tensor(crow, indices.reshape(-1), values.reshape(-1), (n, n_cols))


def index_counts(flat: Tensor, n: int) -> Tensor:
    """torch.bincount(flat, minlength=n) for `flat` in [0, n): the same int64 counts, without the
    host sync of CUDA's bincount (it reads its input's max back before it starts)."""
    return torch.zeros(n, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def fired_latents(indices: Tensor, active: Tensor, n_latents: int) -> Tensor:
    """[n_latents] bool: the latents of `indices` [n, c] where `active` [n, c] holds anywhere. A
    scatter, where `fired[indices[active]] = True` would read the mask's count back to the host on
    CUDA (a sync per training step)."""
    hits = torch.zeros(n_latents, dtype=torch.int32, device=indices.device)
    return hits.scatter_add_(0, indices.reshape(-1), active.reshape(-1).to(torch.int32)) > 0


class TransposedPattern(NamedTuple):
    """A CSR pattern transposed once (latents as rows) so several value sets can reuse it."""

    crow: Tensor
    col: Tensor
    order: Tensor
    shape: tuple[int, int]

    @classmethod
    def of(cls, indices: Tensor, n_latents: int) -> "TransposedPattern":
        n, c = indices.shape
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices.device)
        crow[1:] = index_counts(flat, n_latents).cumsum(0)
        return cls(crow, order // c, order, (n_latents, n))

    def matmul(self, values: Tensor, dense: Tensor) -> Tensor:
        """(sparse [n, n_latents] with these values).T @ dense [n, d] -> [n_latents, d]."""
        vals = values.reshape(-1)[self.order]
        return _csr_tensor(self.crow, self.col, vals, self.shape) @ dense


def sampled_rowdot(indices: Tensor, grad: Tensor, weight: Tensor) -> Tensor:
    """out[i, j] = grad[i] . weight[indices[i, j]]: a sampled dense-dense product, [n, c]."""
    pattern = _csr(indices, torch.zeros(indices.shape, dtype=grad.dtype, device=grad.device), weight.shape[0])
    return torch.sparse.sampled_addmm(pattern, grad, weight.T, beta=0.0).values().view(indices.shape)


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """sum_j values[:, j] * weight[indices[:, j]] -> [n, d], without building the dense [n, n_latents]."""
    return _csr(indices, values.to(weight.dtype), weight.shape[0]) @ weight


def select_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest pre-activations per row (any order) and their indices; ReLU applied.

    For wide rows it first takes, per row, the maximum of each of G = n_latents / g strided
    groups {c, c + G, c + 2G, ...}: every element of the row's top k lies in one of the k groups
    with the largest maxima (a group outside them has k groups with larger maxima above it), so
    the top k of those k * g candidates is the exact top k of the row. With g = 8 this is ~20%
    faster than torch.topk over the whole row on CPU (torch.topk's cost grows with the row)."""
    n, m = pre.shape
    g = _GROUP
    if pre.device.type != "cpu" or m % g or m // g < 4 * k:
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return values.float().relu(), indices
    groups = m // g
    strided = pre.view(n, g, groups)  # element j sits in group j % groups
    top_groups = strided.amax(1).topk(k, dim=-1, sorted=False).indices  # [n, k]
    candidates = strided.gather(2, top_groups[:, None, :].expand(n, g, k)).view(n, g * k)
    values, pos = candidates.topk(k, dim=-1, sorted=False)
    indices = (pos // k) * groups + top_groups.gather(1, pos % k)
    return values.float().relu(), indices


_GROUP = 8


def encoder_preactivations(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """W_enc (x - b_dec) + b_enc in compute_dtype, [n, n_latents].

    The bias rides in the matmul as an extra input column of ones (K padded to a multiple of 32):
    adding it afterwards would be one more pass over the [n, n_latents] result."""
    n, d = x.shape
    extra = 32 - d % 32 if d % 32 else 32
    xa = torch.zeros(n, d + extra, dtype=compute_dtype, device=x.device)
    xa[:, :d] = x - b_dec
    xa[:, d] = 1
    wa = torch.zeros(W_enc.shape[0], d + extra, dtype=compute_dtype, device=x.device)
    wa[:, :d] = W_enc
    wa[:, d] = b_enc
    return xa @ wa.T


def select_batch_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """BatchTopK's selection: the k * n largest pre-activations of the whole [n, m] batch, ReLU
    applied, as [n, c] per token padded with zero values (c: the most any token got), the form
    the sparse kernels take. A padded slot has value 0, so it neither decodes nor gets gradient.
    Under a distributed fit, the k * N largest of the whole batch of N tokens over all ranks
    (`distributed.global_topk`), of which this rank keeps those of its own tokens."""
    n, m = pre.shape
    shard = current_shard()
    if shard is None:
        values, flat = pre.reshape(-1).topk(min(k * n, n * m), sorted=False)
    else:
        values, flat = global_topk(pre.reshape(-1), k * shard.n_global)
    rows = flat // m
    order = torch.argsort(rows, stable=True)
    return pack_rows(rows[order], (flat % m)[order], values[order].float().relu(), n, 0.0)


def pack_rows(rows: Tensor, cols: Tensor, values: Tensor, n: int, fill: float) -> tuple[Tensor, Tensor]:
    """Entries (rows sorted, cols, values) of an [n, m] matrix -> [n, c] values and indices, one
    row per token, c the most entries any row has; a row's unused slots hold `fill` at index 0."""
    counts = index_counts(rows, n)
    width = max(1, int(counts.max()))  # the one read-back: the width sizes the output
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    out_values = torch.full((n, width), fill, dtype=values.dtype, device=rows.device)
    out_indices = torch.zeros(n, width, dtype=torch.int64, device=rows.device)
    out_values[rows, slot] = values
    out_indices[rows, slot] = cols
    return out_values, out_indices


class _TopKSAEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k, compute_dtype, dead, k_aux, select=select_topk, prefixes=()):
        pre = encoder_preactivations(x, W_enc, b_enc, b_dec, compute_dtype)
        values, indices = select(pre, k)
        x_hat = sparse_decode(values, indices, W_dec) + b_dec
        ctx.prefixes = tuple(prefixes)
        prefix_hat = None
        if prefixes:
            prefix_hat = torch.stack([sparse_decode(values * (indices < m), indices, W_dec) + b_dec for m in prefixes])
        aux_values = aux_indices = aux_hat = None
        if dead is not None:
            dead_ids = dead.nonzero().squeeze(1)
            kk = min(k_aux, dead_ids.numel())
            if kk > 0:
                aux_values, pos = select_topk(pre.index_select(1, dead_ids), kk)
                aux_indices = dead_ids[pos]
                aux_hat = sparse_decode(aux_values, aux_indices, W_dec)
        del pre
        ctx.save_for_backward(x, b_dec, W_enc, W_dec, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(values, indices)
        return x_hat, values, indices, aux_hat, prefix_hat

    @staticmethod
    def backward(ctx, grad_x_hat, _gv, _gi, grad_aux_hat, grad_prefix_hat):
        x, b_dec, W_enc, W_dec, values, indices, aux_values, aux_indices = ctx.saved_tensors
        n_latents = W_enc.shape[0]
        if ctx.prefixes and grad_prefix_hat is not None:
            # a latent below boundary m_g feeds prefix g and every wider one, the full output too:
            # group h (bounds[h] <= j < bounds[h + 1]) gets grad_x_hat plus the prefix gradients from h on
            bounds = [0, *ctx.prefixes, n_latents]
            groups, suffix = [], grad_x_hat
            for h in reversed(range(len(bounds) - 1)):
                if h < len(ctx.prefixes):
                    suffix = suffix + grad_prefix_hat[h]
                in_group = (indices >= bounds[h]) & (indices < bounds[h + 1])
                groups.append((values * in_group, indices, suffix))
        else:
            groups = [(values, indices, grad_x_hat)]
        if aux_indices is not None and grad_aux_hat is not None:
            groups.append((aux_values, aux_indices, grad_aux_hat))
        need_x, need_W_enc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        xc = x - b_dec if need_W_enc else None
        grad_W_enc = grad_W_dec = grad_xc = None
        grad_b_enc = torch.zeros(n_latents, dtype=W_enc.dtype, device=W_enc.device)

        def acc(total: Tensor | None, part: Tensor) -> Tensor:
            return part if total is None else total.add_(part)

        patterns: dict[int, TransposedPattern] = {}  # Matryoshka's groups share one index tensor
        for vals, idx, grad_out in groups:
            grad_out = grad_out.contiguous()
            if id(idx) not in patterns:
                patterns[id(idx)] = TransposedPattern.of(idx, n_latents)
            transpose = patterns[id(idx)]
            grad_W_dec = acc(grad_W_dec, transpose.matmul(vals, grad_out))
            # d x_hat / d value = the decoder row; the ReLU passes gradient only where the value is > 0.
            grad_pre = sampled_rowdot(idx, grad_out, W_dec) * (vals > 0)
            grad_b_enc.index_add_(0, idx.reshape(-1), grad_pre.reshape(-1))
            if need_W_enc:
                grad_W_enc = acc(grad_W_enc, transpose.matmul(grad_pre, xc))
            if need_x:
                grad_xc = acc(grad_xc, sparse_decode(grad_pre, idx, W_enc))
        # x_hat = decode + b_dec, and the encoder sees x - b_dec: b_dec's gradient is the
        # output gradient minus what flows into the encoder input. Summed over tokens, the latter
        # is grad_b_enc @ W_enc, with no need for the full [n, d] input gradient.
        grad_b_dec = None
        if ctx.needs_input_grad[4]:
            grad_b_dec = grad_x_hat.sum(0) - grad_b_enc @ W_enc
            if ctx.prefixes and grad_prefix_hat is not None:
                grad_b_dec = grad_b_dec + grad_prefix_hat.sum((0, 1))
        return grad_xc, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, None, None, None, None, None, None


def topk_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    compute_dtype: torch.dtype = torch.float32,
    dead: Tensor | None = None,
    k_aux: int = 0,
    batch: bool = False,
    prefixes: tuple[int, ...] = (),
) -> SparseForward:
    """Training forward of a TopK SAE with a sparse backward.

    x: [n, d] float32 input in the SAE's space; W_enc, W_dec: [n_latents, d] (one row per latent);
    dead: optional [n_latents] bool mask: when given, also returns the reconstruction built from
    the k_aux largest dead pre-activations (for the AuxK loss); batch: BatchTopK's selection (k * n
    over the whole batch) instead of k per token; prefixes: Matryoshka's boundaries, for which it
    also returns the reconstruction from the latents below each (prefix_hat)."""
    select = select_batch_topk if batch else select_topk
    x_hat, values, indices, aux_hat, prefix_hat = _TopKSAEFunction.apply(
        x, W_enc, b_enc, W_dec, b_dec, k, compute_dtype, dead, k_aux, select, tuple(prefixes)
    )
    return SparseForward(x_hat, values, indices, aux_hat, prefix_hat)
