"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014): a gate decides which latents fire, a
magnitude path sharing the gate's encoder (rescaled by exp(r_mag)) decides how much.

Of the two consistent ways to train it this is the paper's (and dictionary_learning's `gdm`):
unit-norm decoder rows, plain L1 on the gate's ReLU, and the auxiliary reconstruction through
the gate path with the decoder and its bias frozen (gradient stopped). The gate's bias learns
only through those two terms: without the auxiliary term it would not learn at all. The first
training batch sets the gate's biases so that each gate opens on k / n_latents of the tokens
(`StartsAtTargetL0`). Training runs the sparse step of sparse_threshold.py while few gates open,
a dense one otherwise.
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
    per_input_norm,
    unit_rows,
)
from routesae.train.sparse_threshold import candidate_mask, encoder_product, gated_sae_forward, sparse_pays


class GatedCoder(StartsAtTargetL0, UnitNormDecoder, Coder):
    """pi_gate = W_enc x' + b_gate; pi_mag = exp(r_mag) * (W_enc x') + b_mag (x' = x - b_dec);
    f = 1[pi_gate > 0] * ReLU(pi_mag); x_hat = W_dec f + b_dec.
    penalty = lambda * ||ReLU(pi_gate)||_1 + ||x - (W_dec ReLU(pi_gate) + b_dec)||^2 (decoder frozen),
    both in NormMSE units."""

    name = "gated"
    has_penalty = True
    default_sparsity_coef = 5.0  # as ReLU + L1's, the L1 on the gate

    def __init__(self, d_model: int, n_latents: int, k: int = 0, generator: torch.Generator | None = None):
        super().__init__(d_model, n_latents)
        rows = unit_rows(n_latents, d_model, generator)
        self.W_enc = nn.Parameter(rows.clone())
        self.b_gate = nn.Parameter(torch.zeros(n_latents))
        self.b_mag = nn.Parameter(torch.zeros(n_latents))
        self.r_mag = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(rows)
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self._init_start(k, n_latents)

    def _place(self, quantile: Tensor) -> None:
        self.b_gate.copy_(-quantile)

    def _paths(self, x: Tensor, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """-> (pi_gate, pi_mag), [n, n_latents] float32."""
        shared = dense_encode(x - self.b_dec, self.W_enc, None, compute_dtype)
        return shared + self.b_gate, shared * self.r_mag.exp() + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        gate, mag = self._paths(x, torch.float32)
        return (gate > 0) * mag.relu()

    def forward_train(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, k_aux: int = 0,
        sparsity_coef: float = 0.0,
    ) -> CoderOutput:
        self.start_from(lambda: (x - self.b_dec) @ self.W_enc.T)
        product = encoder_product(x, self.W_enc, self.b_dec, compute_dtype)
        candidates = candidate_mask(product, self.b_gate.detach(), torch.zeros_like(self.b_gate.detach()))
        l0 = fired = active = None
        if sparse_pays(candidates):
            x_hat, via_gate, gate_l1, l0, fired = gated_sae_forward(
                x, self.W_enc, self.b_gate, self.W_dec, self.b_dec, self.b_mag, self.r_mag, product, candidates)
        else:  # gates still open too often: the dense step
            del product, candidates
            gate, mag = self._paths(x, compute_dtype)
            fires = gate > 0
            f = fires * mag.relu()
            x_hat = dense_decode(f, self.W_dec, self.b_dec, compute_dtype)
            gate_act = gate.relu()
            via_gate = dense_decode(gate_act, self.W_dec.detach(), self.b_dec.detach(), compute_dtype)
            gate_l1 = gate_act.sum(-1)
            active = (fires & (mag > 0)).detach()
        aux = per_input_norm((x - via_gate).pow(2).sum(-1), x)
        penalty = sparsity_coef * per_input_norm(gate_l1, x) + aux
        return CoderOutput(x_hat, None, None, None, penalty, active, l0, fired)

    def export_tensors(self) -> dict[str, Tensor]:
        """SAELens's gated names: W_enc [d_in, d_sae], b_gate, b_mag, r_mag, W_dec [d_sae, d_in], b_dec."""
        return {
            "W_enc": self.W_enc.detach().T.contiguous(),
            "b_gate": self.b_gate.detach().clone(),
            "b_mag": self.b_mag.detach().clone(),
            "r_mag": self.r_mag.detach().clone(),
            "W_dec": self.W_dec.detach().clone(),
            "b_dec": self.b_dec.detach().clone(),
        }
