"""What every coder is: the part of an SAE that turns one normalized input vector into a sparse
code and back, whatever layers the SAE reads (saes/ says which). A coder owns its encoder and
decoder weights, its training forward, the constraints it keeps on them, and its SAELens names.

Weights are stored one row per latent (W_enc and W_dec both [n_latents, d_model]) so the sparse
kernels gather rows; `export_tensors` writes the SAELens orientation (W_enc [d_in, d_sae]).
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from routesae.train.distributed import gather_rows
from routesae.train.sparse_ops import SparseForward, sparse_decode


class Latents(NamedTuple):
    """The active latents of each token, in sparse form (a fixed number per token; zeros do not fire)."""

    values: Tensor
    """[n, c] activations (some may be 0)."""
    indices: Tensor
    """[n, c] latent indices."""


class CoderOutput(NamedTuple):
    """One training forward of a coder."""

    x_hat: Tensor
    """[n, d] reconstruction in the coder's input space, float32."""
    values: Tensor | None
    """[n, c] kept activations (no gradient; zeros do not fire); None where `active` is given."""
    indices: Tensor | None
    """[n, c] their latent indices."""
    aux_hat: Tensor | None
    """[n, d] AuxK reconstruction from dead latents (TopK-like coders), or None."""
    penalty: Tensor
    """Scalar added to the loss: the sparsity term times its coefficient (0 for TopK-like coders),
    plus any auxiliary reconstruction term of the architecture, in NormMSE units (see `per_input_norm`)."""
    active: Tensor | None = None
    """[n, n_latents] bool, which latents fire: dense coders give this (or `l0` and `fired`)
    instead of values/indices."""
    l0: Tensor | None = None
    """[n] latents firing per token, where the coder counted them already (saves a pass over `active`)."""
    fired: Tensor | None = None
    """[n_latents] bool, latents that fired on the batch, where the coder knows them without `active`."""


def per_input_norm(per_token: Tensor, x: Tensor) -> Tensor:
    """mean over tokens of per_token / ||x||^2: a penalty in the units of NormMSE. On the usual
    per-token normalized input ||x||^2 = d, so lambda keeps the meaning it has in the literature's
    loss ||x - x_hat||^2 + lambda * S at input norm sqrt(d), divided through by d."""
    return (per_token / x.pow(2).sum(-1).clamp_min(1e-12)).mean()


def dense_decode(f: Tensor, W_dec: Tensor, b_dec: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """f [n, n_latents] @ W_dec + b_dec with the matmul in compute_dtype (bf16 where fast), float32 out."""
    if compute_dtype == torch.float32:
        return torch.addmm(b_dec, f, W_dec)
    return (f.to(compute_dtype) @ W_dec.to(compute_dtype)).float() + b_dec


def dense_encode(x: Tensor, W_enc: Tensor, bias: Tensor | None, compute_dtype: torch.dtype) -> Tensor:
    """x [n, d] @ W_enc.T (+ bias) with the matmul in compute_dtype, float32 out (autograd-friendly)."""
    if compute_dtype == torch.float32:
        return x @ W_enc.T if bias is None else torch.addmm(bias, x, W_enc.T)
    out = x.to(compute_dtype) @ W_enc.to(compute_dtype).T
    # bf16 + float32 promotes to float32 in one pass over [n, n_latents] (the same values as
    # .float() then + bias, which is two)
    return out.float() if bias is None else out + bias


class Coder(nn.Module, abc.ABC):
    """Base class of the coders; subclasses set `name` and implement `encode` and `forward_train`."""

    name: ClassVar[str]
    fixed_l0: ClassVar[bool] = False
    """True where the code has a set number of active latents per token (k): no sparsity coefficient."""
    has_penalty: ClassVar[bool] = False
    """True where forward_train's penalty can be non-zero (logged as `penalty` in metrics.jsonl)."""
    default_sparsity_coef: ClassVar[float] = 0.0
    """The sparsity coefficient when none is given (coders without a fixed k)."""
    targets_l0_itself: ClassVar[bool] = False
    """True where the penalty itself aims at L0 = k, so the coefficient is not steered (JumpReLU)."""

    def __init__(self, d_model: int, n_latents: int):
        super().__init__()
        self._shape = (n_latents, d_model)

    @property
    def n_latents(self) -> int:
        return self._shape[0]

    @property
    def d_model(self) -> int:
        return self._shape[1]

    # --- inference (float32) ---------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """[n, d] normalized input -> dense [n, n_latents] activations."""

    def encode_sparse(self, x: Tensor) -> Latents:
        """[n, d] normalized input -> the non-zero latents of each token, padded with zeros to the
        largest count in the batch."""
        z = self.encode(x)
        width = max(1, int((z != 0).sum(1).max())) if z.numel() else 1
        values, indices = z.topk(width, dim=-1, sorted=False)
        return Latents(values, indices)

    def decode(self, z: Tensor) -> Tensor:
        """Dense [n, n_latents] activations -> [n, d] reconstruction in the normalized space."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, latents: Latents) -> Tensor:
        """Sparse latents -> [n, d] reconstruction in the normalized space."""
        return sparse_decode(latents.values, latents.indices, self.W_dec) + self.b_dec

    # --- training --------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_train(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, k_aux: int = 0,
        sparsity_coef: float = 0.0,
    ) -> CoderOutput:
        """Training forward on x [n, d] float32 (normalized space)."""

    def lr_scales(self) -> list[tuple[nn.Parameter, float]]:
        """Parameters that train at a multiple of the learning rate (none by default)."""
        return []

    def constrain_grad_(self) -> None:
        """Called after backward, before the optimizer step (unit-norm decoders drop the parallel part)."""

    def constrain_weights_(self) -> None:
        """Called after the optimizer step (unit-norm decoders are renormalized)."""

    # --- saving ----------------------------------------------------------------------------------
    def export_tensors(self) -> dict[str, Tensor]:
        """Weights under SAELens names: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]."""
        return {
            "W_enc": self.W_enc.detach().T.contiguous(),
            "b_enc": self.b_enc.detach().clone(),
            "W_dec": self.W_dec.detach().clone(),
            "b_dec": self.b_dec.detach().clone(),
        }

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of export_tensors."""
        for name in self.export_tensors():
            value = tensors[name]
            getattr(self, name).copy_(value.T if name == "W_enc" else value)


def unit_rows(n_latents: int, d_model: int, generator: torch.Generator | None) -> Tensor:
    """Random unit-norm directions [n_latents, d_model]."""
    directions = torch.randn(n_latents, d_model, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True)


class UnitNormDecoder:
    """Mixin: decoder rows kept at unit norm (TopK-like coders, as OpenAI and sparsify do)."""

    W_dec: nn.Parameter

    @torch.no_grad()
    def constrain_grad_(self) -> None:
        """Drop the part of each decoder row's gradient along the row, before the optimizer step,
        so the loss cannot lower itself by growing or shrinking rows. Adam's per-element scaling
        still lets norms drift a little: `constrain_weights_` follows."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def constrain_weights_(self) -> None:
        """Set every decoder row back to unit norm, after the optimizer step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))


def jump(pre: Tensor, threshold: Tensor | float) -> Tensor:
    """pre * 1[pre > threshold]: a JumpReLU (a rectified code for a threshold >= 0)."""
    return pre * (pre > threshold)


class StartsAtTargetL0:
    """Mixin for coders without a k: the first training batch places each latent's firing point
    (a threshold, or a bias's negative) at the (1 - k / n_latents) quantile of its pre-activations,
    so the SAE starts at its target L0 and the sparsity coefficient only has to keep it there.
    Adam moves a threshold or bias by about the learning rate per step, too little to climb there
    from a fixed start within a budget of a thousand steps."""

    def _init_start(self, k: int, n_latents: int) -> None:
        self.target_fraction = min(1.0, k / n_latents) if k > 0 else 0.0
        """Share of tokens each latent fires on at the start (0: no such start)."""
        self.register_buffer("started", torch.tensor(False))
        self._seen_started = False

    @abc.abstractmethod
    def _place(self, quantile: Tensor) -> None:
        """Set the firing points from the per-latent quantile [n_latents] of this batch."""

    @torch.no_grad()
    def start_from(self, pre: Callable[[], Tensor]) -> None:
        """On the first training batch: pre() gives the [n, n_latents] pre-activations the firing
        points cut (called then only: every later step skips it)."""
        if not self.training or self._seen_started:
            return
        if not bool(self.started):  # read once (a host sync on a GPU), then remembered
            if self.target_fraction > 0:
                # distributed: the quantile of the whole batch's rows, gathered from every rank
                self._place(torch.quantile(gather_rows(pre().float()), 1 - self.target_fraction, dim=0))
            self.started.fill_(True)
        self._seen_started = True

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        super().load_exported(tensors)
        self.started.fill_(True)  # trained firing points: never reset from a batch


def no_penalty(out: SparseForward) -> CoderOutput:
    """A TopK-like forward as a CoderOutput: sparsity is set by k, no loss term."""
    return CoderOutput(out.x_hat, out.values, out.indices, out.aux_hat, out.x_hat.new_zeros(()))
