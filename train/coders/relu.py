"""ReLU + L1, the "vanilla" SAE, in its April-2024 form (Anthropic's update; SAELens `standard`,
dictionary_learning `StandardTrainerAprilUpdate`): no constraint on the decoder, the L1 of each
latent weighted by its decoder row's norm, so that shrinking the encoder while growing the
decoder buys nothing. The first training batch sets the encoder's biases so that each latent
fires on k / n_latents of the tokens (`StartsAtTargetL0`). Training runs the sparse step of
sparse_threshold.py while few pre-activations are positive, a dense one otherwise."""

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
from routesae.train.sparse_threshold import candidate_mask, encoder_product, relu_sae_forward, sparse_pays

DECODER_INIT_NORM = 1.0
"""Decoder rows start at this norm, the encoder as their transpose. The April-2024 recipe leaves it
to the data ("0.05 to 1"); on the per-token normalized input (norm sqrt(d)) 1 makes a latent's
contribution f_i ||d_i|| start at the scale a unit-norm coder's has, so the coefficient means at
the start what it means for gated. At 0.1 both weights had to grow tenfold before the SAE could
reconstruct anything: in a budget of hundreds of steps the L0 ran to ~1,000 in the warm-up, the
coefficient had to climb 8x to bring it back, and the SAE ended at NormMSE 0.8 (0.2 at 1), its L0
on held-out text 30% off the one it was steered to in training."""


class ReLUCoder(StartsAtTargetL0, Coder):
    """f = ReLU(W_enc (x - b_dec) + b_enc); x_hat = W_dec f + b_dec;
    penalty = lambda * sum_i f_i ||W_dec,i|| (a crosscoder's: sum_i f_i sum_l ||W_dec,i^l||), in NormMSE units."""

    name = "relu"
    has_penalty = True
    default_sparsity_coef = 5.0  # the April-2024 recipe's lambda at input norm sqrt(d)

    def __init__(self, d_model: int, n_latents: int, k: int = 0, generator: torch.Generator | None = None,
                 blocks: int = 1):
        super().__init__(d_model, n_latents)
        if d_model % blocks:
            raise ValueError(f"{blocks} decoder blocks do not divide the width {d_model}")
        self.blocks = blocks
        """Equal parts of a decoder row whose norms are summed in the penalty (a crosscoder's layers; 1: the row)."""
        rows = unit_rows(n_latents, d_model, generator) * DECODER_INIT_NORM
        self.W_enc = nn.Parameter(rows.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(rows)
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self._init_start(k, n_latents)

    def _place(self, quantile: Tensor) -> None:
        self.b_enc.copy_(-quantile)

    def decoder_norms(self) -> Tensor:
        """[n_latents] the weight of each latent's L1: its decoder row's norm, or the sum of its blocks' norms."""
        if self.blocks == 1:
            return self.W_dec.norm(dim=1)
        return self.W_dec.view(self.n_latents, self.blocks, -1).norm(dim=-1).sum(-1)

    def encode(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T).relu()

    def forward_train(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, k_aux: int = 0,
        sparsity_coef: float = 0.0,
    ) -> CoderOutput:
        self.start_from(lambda: (x - self.b_dec) @ self.W_enc.T)
        product = encoder_product(x, self.W_enc, self.b_dec, compute_dtype)
        candidates = candidate_mask(product, self.b_enc.detach(), torch.zeros_like(self.b_enc.detach()))
        l0 = fired = active = None
        if sparse_pays(candidates):
            x_hat, l0, fired, weighted_l1 = relu_sae_forward(
                x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.decoder_norms(), product, candidates)
        else:  # biases still low, or the L1 too weak yet: the dense step
            del product, candidates
            f = dense_encode(x - self.b_dec, self.W_enc, self.b_enc, compute_dtype).relu()
            x_hat = dense_decode(f, self.W_dec, self.b_dec, compute_dtype)
            weighted_l1 = f @ self.decoder_norms()
            active = (f > 0).detach()
        penalty = sparsity_coef * per_input_norm(weighted_l1, x)
        return CoderOutput(x_hat, None, None, None, penalty, active, l0, fired)
