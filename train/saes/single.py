"""SAEs on one layer: the reader, and the single-layer architectures it makes with each coder
(TopK, Gao et al. 2024 and sparsify, is the RouteSAE paper's single-layer baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from routesae.train.normalize import denormalize
from routesae.train.saes.base import SAE, register


class SingleLayerSAE(SAE):
    """Reads one layer, `config.layers[0]`; input and output are [..., d_model]."""

    def coder_input(self, x: Tensor) -> Tensor:
        """Model space [n, d_model] -> the normalized input the coder encodes."""
        self._check_input(x, None)
        return self.normalize_input(x)[0]

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Model space [..., d_model] -> reconstruction [..., d_model] in model space (the per-token
        normalization is undone with x's own mean and std)."""
        x, lead = self._flatten(x)
        x_norm, mean, std = self.normalize_input(x)
        return self._unflatten(denormalize(self.coder.decode_sparse(self.coder.encode_sparse(x_norm)), mean, std), lead)


@register
class TopKSAE(SingleLayerSAE):
    arch = "topk"
    coder_name = "topk"


@register
class BatchTopKSAE(SingleLayerSAE):
    arch = "batchtopk"
    coder_name = "batchtopk"


@register
class MatryoshkaSAE(SingleLayerSAE):
    arch = "matryoshka"
    coder_name = "matryoshka"


@register
class VanillaSAE(SingleLayerSAE):
    """ReLU + L1 (the paper's "Vanilla")."""

    arch = "vanilla"
    coder_name = "relu"


@register
class GatedSAE(SingleLayerSAE):
    arch = "gated"
    coder_name = "gated"


@register
class JumpReLUSAE(SingleLayerSAE):
    arch = "jumprelu"
    coder_name = "jumprelu"
