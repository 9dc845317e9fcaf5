"""How an SAE makes its code sparse, one file per coder, registered by name: a new coder is a file
that subclasses `Coder` plus one line in CODERS."""

from __future__ import annotations

import torch

from routesae.train.coders.base import Coder, CoderOutput, Latents
from routesae.train.coders.batchtopk import BatchTopKCoder
from routesae.train.coders.gated import GatedCoder
from routesae.train.coders.jumprelu import JumpReLUCoder
from routesae.train.coders.matryoshka import MatryoshkaCoder
from routesae.train.coders.relu import ReLUCoder
from routesae.train.coders.topk import TopKCoder

CODERS: dict[str, type[Coder]] = {
    c.name: c for c in (TopKCoder, BatchTopKCoder, MatryoshkaCoder, ReLUCoder, GatedCoder, JumpReLUCoder)
}


def build_coder(name: str, d_model: int, n_latents: int, k: int, generator: torch.Generator | None = None,
                **options) -> Coder:
    """A freshly initialised coder; k is the TopK-like coders' active latents per token (the others'
    target L0); options: a coder's own settings (Matryoshka's prefixes)."""
    if name not in CODERS:
        raise KeyError(f"unknown coder {name!r}; known: {sorted(CODERS)}")
    return CODERS[name](d_model, n_latents, k, generator, **options)


__all__ = ["CODERS", "BatchTopKCoder", "Coder", "CoderOutput", "GatedCoder", "JumpReLUCoder", "Latents",
           "MatryoshkaCoder", "ReLUCoder", "TopKCoder", "build_coder"]
