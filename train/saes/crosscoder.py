"""Acausal crosscoder (Anthropic, Oct 2024): one code read from all the routed layers at once and
written back to each, f = TopK(sum_l W_enc^l x^l + b_enc), x_hat^l = W_dec^l f + b_dec^l.

Each layer is normalized on its own, then the layers sit side by side, so the coder is the TopK
coder on vectors of n_layers * d_model (its decoder rows, all layers together, at unit norm) and
the loss is the NormMSE of all layers together. Its L0 is k. Exported in the layouts crosscoder
code uses: W_enc [n_layers, d_in, d_sae], W_dec [d_sae, n_layers, d_in], b_dec [n_layers, d_in]."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from routesae.train.config import SAEConfig
from routesae.train.normalize import denormalize
from routesae.train.saes.base import SAE, register


@register
class Crosscoder(SAE):
    """Input and reconstruction: [..., n_layers, d_model], the layers `config.layers`, model space."""

    arch = "crosscoder"
    coder_name = "topk"
    multi_layer = True

    @classmethod
    def coder_width(cls, config: SAEConfig) -> int:
        return len(config.layers) * config.d_model

    @property
    def n_layers(self) -> int:
        return len(self.config.layers)

    def coder_input(self, x: Tensor) -> Tensor:
        """Model space [n, n_layers, d] -> [n, n_layers * d]: each layer normalized, side by side."""
        self._check_input(x, self.n_layers)
        return self.normalize_input(x)[0].reshape(x.shape[0], -1)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Model space [..., n_layers, d] -> [..., n_layers, d]: every layer's reconstruction from the one code."""
        x, lead = self._flatten(x)
        x_norm, mean, std = self.normalize_input(x)
        rec = self.coder.decode_sparse(self.coder.encode_sparse(x_norm.reshape(x.shape[0], -1))).view_as(x_norm)
        return self._unflatten(denormalize(rec, mean, std), lead)

    # --- saving: the per-layer layouts -----------------------------------------------------------
    def export_tensors(self) -> dict[str, Tensor]:
        c, n_layers, d = self.coder, self.n_layers, self.config.d_model
        return {
            "W_enc": c.W_enc.detach().view(-1, n_layers, d).permute(1, 2, 0).contiguous(),
            "b_enc": c.b_enc.detach().clone(),
            "W_dec": c.W_dec.detach().view(-1, n_layers, d).clone(),
            "b_dec": c.b_dec.detach().view(n_layers, d).clone(),
        }

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        c = self.coder
        c.W_enc.copy_(tensors["W_enc"].permute(2, 0, 1).reshape(c.W_enc.shape))
        c.b_enc.copy_(tensors["b_enc"])
        c.W_dec.copy_(tensors["W_dec"].reshape(c.W_dec.shape))
        c.b_dec.copy_(tensors["b_dec"].reshape(-1))


@register
class ReLUCrosscoder(Crosscoder):
    """The crosscoder's L1 form: ReLU, the L1 of each latent weighted by the sum of its per-layer
    decoder norms, the sparsity coefficient steered toward L0 = k (as vanilla's)."""

    arch = "crosscoder-relu"
    coder_name = "relu"

    @classmethod
    def coder_options(cls, config: SAEConfig) -> dict[str, Any]:
        return {"blocks": len(config.layers)}
