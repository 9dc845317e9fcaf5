"""TopK (Gao et al. 2024; sparsify): keep each token's k largest pre-activations, ReLU them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routesae.train.coders.base import Coder, CoderOutput, Latents, UnitNormDecoder, no_penalty, unit_rows
from routesae.train.sparse_ops import select_topk, topk_sae_forward


class TopKCoder(UnitNormDecoder, Coder):
    """pre = W_enc (x - b_dec) + b_enc; keep the top k, ReLU them; x_hat = W_dec z + b_dec; decoder
    rows unit norm, initialised as the encoder's.

    The ReLU after the top-k follows OpenAI and sparsify; the RouteSAE authors' code has none
    (so negative pre-activations could pass there)."""

    name = "topk"
    fixed_l0 = True

    def __init__(self, d_model: int, n_latents: int, k: int, generator: torch.Generator | None = None):
        super().__init__(d_model, n_latents)
        if not 0 < k <= n_latents:
            raise ValueError(f"k={k} must be between 1 and the latent count {n_latents}")
        self.k = k
        directions = unit_rows(n_latents, d_model, generator)
        self.W_enc = nn.Parameter(directions.clone())
        """[n_latents, d_model] encoder rows."""
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(directions)
        """[n_latents, d_model] decoder rows (unit norm)."""
        self.b_dec = nn.Parameter(torch.zeros(d_model))

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

    # --- training --------------------------------------------------------------------------------
    def forward_train(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, k_aux: int = 0,
        sparsity_coef: float = 0.0,
    ) -> CoderOutput:
        """Training forward with the sparse backward (see sparse_ops); x [n, d] float32."""
        return no_penalty(topk_sae_forward(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, compute_dtype, dead, k_aux
        ))
