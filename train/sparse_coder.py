"""The TopK dictionary every architecture here shares: encoder, top-k + ReLU, unit-norm decoder.

It works in the SAE's normalized space only; reading layers and normalizing them is the job of
the architectures in `saes/`. Weights are stored one row per latent (W_enc and W_dec both
[n_latents, d_model]) so the sparse kernels gather rows; `SAE.export_tensors` writes the
SAELens orientation (W_enc [d_in, d_sae]).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from routesae.train.sparse_ops import SparseForward, select_topk, sparse_decode, topk_sae_forward


class Latents(NamedTuple):
    """The k active latents of each token, in sparse form."""

    values: Tensor
    """[n, k] activations (after ReLU; some may be 0)."""
    indices: Tensor
    """[n, k] latent indices."""


class TopKCoder(nn.Module):
    """pre = W_enc (x - b_dec) + b_enc; keep the top k, ReLU them; x_hat = W_dec z + b_dec.

    The ReLU after the top-k follows OpenAI and sparsify; the RouteSAE authors' code has none
    (so negative pre-activations could pass there)."""

    def __init__(self, d_model: int, n_latents: int, k: int, generator: torch.Generator | None = None):
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k={k} must be between 1 and the latent count {n_latents}")
        self.k = k
        directions = torch.randn(n_latents, d_model, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(directions.clone())
        """[n_latents, d_model] encoder rows."""
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(directions)
        """[n_latents, d_model] decoder rows (unit norm), initialised as the encoder's transpose."""
        self.b_dec = nn.Parameter(torch.zeros(d_model))

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    # --- inference (dense autograd, float32) -----------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        """[n, d] normalized input -> [n, n_latents] pre-activations."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)

    def encode_sparse(self, x: Tensor) -> Latents:
        """[n, d] normalized input -> the top-k latents of each token."""
        values, indices = select_topk(self.pre_activations(x), self.k)
        return Latents(values, indices)

    def encode(self, x: Tensor) -> Tensor:
        """[n, d] normalized input -> dense [n, n_latents] activations (zeros outside the top k)."""
        latents = self.encode_sparse(x)
        z = torch.zeros(x.shape[0], self.n_latents, dtype=latents.values.dtype, device=x.device)
        return z.scatter_(1, latents.indices, latents.values)

    def decode(self, z: Tensor) -> Tensor:
        """Dense [n, n_latents] activations -> [n, d] reconstruction in the normalized space."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, latents: Latents) -> Tensor:
        """Sparse latents -> [n, d] reconstruction in the normalized space."""
        return sparse_decode(latents.values, latents.indices, self.W_dec) + self.b_dec

    # --- training --------------------------------------------------------------------------------
    def forward_train(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, k_aux: int = 0
    ) -> SparseForward:
        """Training forward with the sparse backward (see sparse_ops); x [n, d] float32."""
        return topk_sae_forward(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, compute_dtype, dead, k_aux
        )

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the part of each decoder row's gradient along the row, before the optimizer step
        (as sparsify and OpenAI do), so the loss cannot lower itself by growing or shrinking rows.
        Adam's per-element scaling still lets norms drift a little: `normalize_decoder_` follows."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Set every decoder row back to unit norm, after the optimizer step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))
