"""ReLU + L1, the "vanilla" SAE, in its April-2024 form (Anthropic's update; SAELens `standard`,
dictionary_learning `StandardTrainerAprilUpdate`): no constraint on the decoder, the L1 of each
latent weighted by its decoder row's norm, so that shrinking the encoder while growing the
decoder buys nothing. The first training batch sets the encoder's biases so that each latent
fires on k / n_latents of the tokens (`StartsAtTargetL0`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routesae.train.coders.base import (
    Coder,
    CoderOutput,
    StartsAtTargetL0,
    dense_decode,
    dense_encode,
    per_input_norm,
    unit_rows,
)

DECODER_INIT_NORM = 0.1
"""Decoder rows start at this norm (the April-2024 recipe), the encoder as their transpose."""


class ReLUCoder(StartsAtTargetL0, Coder):
    """f = ReLU(W_enc (x - b_dec) + b_enc); x_hat = W_dec f + b_dec;
    penalty = lambda * sum_i f_i ||W_dec,i||, in NormMSE units."""

    name = "relu"
    default_sparsity_coef = 5.0  # the April-2024 recipe's lambda at input norm sqrt(d)

    def __init__(self, d_model: int, n_latents: int, k: int = 0, generator: torch.Generator | None = None):
        super().__init__(d_model, n_latents)
        rows = unit_rows(n_latents, d_model, generator) * DECODER_INIT_NORM
        self.W_enc = nn.Parameter(rows.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(rows)
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self._init_start(k, n_latents)

    def _place(self, quantile: Tensor) -> None:
        self.b_enc.copy_(-quantile)

    def encode(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T).relu()

    def forward_train(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, k_aux: int = 0,
        sparsity_coef: float = 0.0,
    ) -> CoderOutput:
        self.start_from(((x - self.b_dec) @ self.W_enc.T).detach())
        f = dense_encode(x - self.b_dec, self.W_enc, self.b_enc, compute_dtype).relu()
        x_hat = dense_decode(f, self.W_dec, self.b_dec, compute_dtype)
        weighted_l1 = f @ self.W_dec.norm(dim=1)
        return CoderOutput(x_hat, None, None, None, sparsity_coef * per_input_norm(weighted_l1, x), (f > 0).detach())
