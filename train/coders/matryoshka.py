"""Matryoshka BatchTopK (Bussmann et al. 2025, arXiv 2503.17547): one BatchTopK encoder whose
dictionary's prefixes m_1 < m_2 < ... < n_latents must each reconstruct on their own, so the first
latents learn the most general directions. Loss: the sum over the nested dictionaries of their
NormMSE (the full one is the logged nmse; the others are the penalty). The sparse kernel computes
every prefix's reconstruction from the same kept latents (sparse_ops)."""

from __future__ import annotations

import torch
from torch import Tensor

from routesae.train.coders.base import CoderOutput
from routesae.train.coders.batchtopk import BatchTopKCoder
from routesae.train.sparse_ops import topk_sae_forward

DEFAULT_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
"""Default prefix boundaries as fractions of the dictionary: Bussmann's groups of 1/16, 1/16,
1/8, 1/4 and 1/2 of it, cumulated."""


def default_prefixes(n_latents: int) -> list[int]:
    return sorted({max(1, round(f * n_latents)) for f in DEFAULT_FRACTIONS} - {n_latents})


class MatryoshkaCoder(BatchTopKCoder):
    """BatchTopK's encoder and inference threshold; every prefix of the dictionary decodes too."""

    name = "matryoshka"
    has_penalty = True

    def __init__(self, d_model: int, n_latents: int, k: int, generator: torch.Generator | None = None,
                 prefixes: list[int] | None = None):
        super().__init__(d_model, n_latents, k, generator)
        self.prefixes = tuple(default_prefixes(n_latents) if prefixes is None else prefixes)
        if list(self.prefixes) != sorted(set(self.prefixes)) or not all(0 < m < n_latents for m in self.prefixes):
            raise ValueError(f"Matryoshka prefixes must rise strictly within (0, {n_latents}), got {list(self.prefixes)}")

    def forward_train(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, k_aux: int = 0,
        sparsity_coef: float = 0.0,
    ) -> CoderOutput:
        out = topk_sae_forward(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, compute_dtype, dead,
                               k_aux, batch=True, prefixes=self.prefixes)
        self._track_threshold(out.values)
        norm2 = x.pow(2).sum(-1).clamp_min(1e-12)
        penalty = ((out.prefix_hat - x).pow(2).sum(-1) / norm2).mean(-1).sum()
        return CoderOutput(out.x_hat, out.values, out.indices, out.aux_hat, penalty)
