"""Any SAE's code of a batch of stored tokens as a flat list of (token, latent, value, layer)
entries: the one view of a code the interpretation stage needs, whatever the architecture.

- single-layer SAEs, crosscoders: the token's code; no layer.
- RouteSAE: the code of its routed input, and the layer the router chose (under soft routing, the
  layer of largest weight).
- MLSAE: one code per (token, layer); a latent's activation at a token is its largest over the
  layers, and the layer is where that largest came from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TokenCodes(NamedTuple):
    """The non-zero latents of n tokens, one entry each."""

    rows: Tensor
    """[E] int64 index of the token in the batch."""
    latents: Tensor
    """[E] int64 latent index."""
    values: Tensor
    """[E] float32 activation (> 0)."""
    layers: Tensor | None
    """[E] int64 index into the SAE's layers, where the SAE has one layer per activation; else None."""


def has_layer_per_activation(sae: torch.nn.Module) -> bool:
    """RouteSAE (a routed layer per token) and MLSAE (a layer per (token, layer) code)."""
    return hasattr(sae, "route") or hasattr(sae, "at_layer")


def sae_input(sae: torch.nn.Module, acts: dict[int, Tensor]) -> Tensor:
    """Stored activations (layer -> [n, d]) -> what the SAE reads: [n, d] or [n, n_layers, d]."""
    layers = list(sae.config.layers)
    if not getattr(sae, "multi_layer", False):
        return acts[layers[0]]
    return torch.stack([acts[layer] for layer in layers], dim=1)


@torch.no_grad()
def token_codes(sae: torch.nn.Module, x: Tensor) -> TokenCodes:
    """x: the SAE's input for n tokens, model space (see `sae_input`)."""
    lat = sae.encode_sparse(x)
    values, indices = lat.values.float(), lat.indices
    per_row = values.shape[1]
    rows = torch.arange(values.shape[0], device=values.device).repeat_interleave(per_row)
    values, latents = values.reshape(-1), indices.reshape(-1).long()
    layers: Tensor | None = None
    if hasattr(sae, "at_layer"):  # MLSAE: rows are token-major (token, layer) pairs
        n_layers = len(sae.config.layers)
        layers = rows % n_layers
        rows = rows // n_layers
    elif hasattr(sae, "route"):
        layers = sae.route(x).layer_index.to(values.device).long().repeat_interleave(per_row)
    fired = values > 0
    rows, latents, values = rows[fired], latents[fired], values[fired]
    if layers is not None:
        layers = layers[fired]
    if hasattr(sae, "at_layer"):
        rows, latents, values, layers = _max_over_layers(rows, latents, values, layers, sae.config.n_latents)
    return TokenCodes(rows, latents, values, layers)


def _max_over_layers(rows: Tensor, latents: Tensor, values: Tensor, layers: Tensor, n_latents: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One entry per (row, latent): the largest value and the layer it came from."""
    key = rows * n_latents + latents
    order = torch.sort(values, descending=True, stable=True).indices
    order = order[torch.sort(key[order], stable=True).indices]  # by key, largest value first
    key = key[order]
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    pick = order[first]
    return rows[pick], latents[pick], values[pick], layers[pick]
