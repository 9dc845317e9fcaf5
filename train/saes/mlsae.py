"""MLSAE (Lawson et al. 2024, arXiv 2409.04185): one TopK SAE trained on every (token, layer) pair
of the routed layers, each vector normalized on its own, and no input that says which layer a
vector came from. At evaluation each layer is reconstructed (and spliced) on its own: `at_layer`
gives a single-layer view of the same dictionary."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from routesae.train.normalize import denormalize
from routesae.train.saes.base import SAE, register
from routesae.train.saes.single import SingleLayerSAE


@register
class MLSAE(SAE):
    """Input: [n, n_layers, d_model] (or any leading dims before n_layers), the layers
    `config.layers` of the same tokens, in model space; the coder sees them as n * n_layers
    separate vectors."""

    arch = "mlsae"
    coder_name = "topk"
    multi_layer = True

    @property
    def n_layers(self) -> int:
        return len(self.config.layers)

    def coder_input(self, x: Tensor) -> Tensor:
        """Model space [n, n_layers, d] -> [n * n_layers, d] normalized vectors, token-major."""
        self._check_input(x, self.n_layers)
        return self.normalize_input(x)[0].reshape(-1, self.config.d_model)

    def _codes_per_token(self) -> tuple[int, ...]:
        return (self.n_layers,)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Model space [..., n_layers, d] -> [..., n_layers, d]: each layer's reconstruction, model space."""
        x, lead = self._flatten(x)
        x_norm, mean, std = self.normalize_input(x)
        flat = x_norm.reshape(-1, self.config.d_model)
        rec = self.coder.decode_sparse(self.coder.encode_sparse(flat)).view_as(x_norm)
        return self._unflatten(denormalize(rec, mean, std), lead)

    def at_layer(self, layer: int) -> SingleLayerSAE:
        """This dictionary as a single-layer SAE of `layer` (sharing its weights): what evaluates
        and splices one layer at a time."""
        i = self.config.layers.index(layer)
        scale = [self.config.dataset_scale[i]] if self.config.dataset_scale else None
        view = _LayerView(replace(self.config, layers=[layer], dataset_scale=scale))
        view.coder = self.coder
        view.training_info = getattr(self, "training_info", {})
        return view.to(self.device).eval()


class _LayerView(SingleLayerSAE):
    """One layer of an MLSAE: a single-layer TopK SAE over the MLSAE's coder (not registered)."""

    arch = "mlsae"
    coder_name = "topk"
