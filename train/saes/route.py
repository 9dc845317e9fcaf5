"""RouteSAE (arXiv 2503.08200): a router picks, per token, which of several layers one shared
TopK SAE encodes.

The router is Linear(d_model, n_layers, bias=False) on the sum (or mean) of the normalized routed
layers, then a softmax. Hard routing feeds the coder p * x_norm of the arg-max layer: that product
is also the loss's target and the router's only path to a gradient. Soft routing feeds the mix
sum_i p_i * x_norm_i.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from routesae.errors import RouteSAEError
from routesae.train.config import SAEConfig
from routesae.train.normalize import denormalize, token_stats
from routesae.train.saes.base import SAE, TrainOutput, register
from routesae.train.sparse_ops import index_counts


class Routing(NamedTuple):
    """The router's decision per token."""

    layer_index: Tensor
    """[n] int64: the arg-max layer, as an index into `config.layers`."""
    weight: Tensor
    """[n] float32: its probability p (the factor hard routing multiplies the layer by)."""
    probs: Tensor
    """[n, n_layers] float32: the softmax over the routed layers."""


class RoutedReconstruction(NamedTuple):
    """A hard-routed reconstruction: one layer per token, in model space."""

    x_hat: Tensor
    """[n, d_model]: reconstruction of the activation at the routed layer, model space, p divided back out."""
    layer_index: Tensor
    """[n] int64: which layer each row belongs to, as an index into `config.layers`."""
    weight: Tensor
    """[n] float32: the p the coder's input was multiplied by."""


@register
class RouteSAE(SAE):
    """Input: [n, n_layers, d_model] (or any leading dims before n_layers), the layers
    `config.layers` of the same tokens, in model space."""

    arch = "routesae"
    multi_layer = True

    def __init__(self, config: SAEConfig, generator: torch.Generator | None = None):
        super().__init__(config, generator)
        self.router = nn.Linear(config.d_model, len(config.layers), bias=False)
        with torch.no_grad():  # nn.Linear's default range, drawn from our generator for reproducibility
            bound = 1 / math.sqrt(config.d_model)
            self.router.weight.uniform_(-bound, bound, generator=generator)

    @property
    def n_layers(self) -> int:
        return len(self.config.layers)

    def _stats(self, xf: Tensor) -> tuple[Tensor, Tensor]:
        """Per token and layer (mean, std) [n, n_layers, 1] of the normalization, x_norm = (x - mean) / std."""
        if self.config.normalization == "token":
            return token_stats(xf)
        zeros = torch.zeros_like(xf[..., :1])
        if self.config.normalization == "dataset":
            return zeros, (1 / self.dataset_scale).expand_as(zeros)
        return zeros, torch.ones_like(zeros)

    def _picked_stats(self, picked: Tensor, layer_index: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) [n, 1] of one layer per token, `picked` [n, d] float32 from layers `layer_index`."""
        if self.config.normalization == "token":
            return token_stats(picked)
        zeros = torch.zeros_like(picked[:, :1])
        if self.config.normalization == "dataset":
            return zeros, (1 / self.dataset_scale)[layer_index]
        return zeros, torch.ones_like(zeros)

    def _route_parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Model space [n, n_layers, d] -> (x float32, mean, std, router probs [n, n_layers]).

        The normalized layers are never materialised: the router's input sum_i (x_i - mean_i) / std_i
        is one batched [1, n_layers] @ [n_layers, d] product per token, and only the routed layer is
        normalized afterwards: no second [n, n_layers, d] float32 tensor is written."""
        xf = x.to(self.device).float()
        mean, std = self._stats(xf)
        inv = 1 / std
        pooled = torch.bmm(inv.transpose(1, 2), xf).squeeze(1) - (mean * inv).sum(1)
        if self.config.aggregate == "mean":
            pooled = pooled / self.n_layers
        probs = torch.softmax(self.router(pooled).float(), dim=-1)
        return xf, mean, std, probs

    @staticmethod
    def _pick(xf: Tensor, mean: Tensor, std: Tensor, layer_index: Tensor, weight: Tensor) -> Tensor:
        """weight * x_norm of layer `layer_index` per token: [n, d]."""
        rows = torch.arange(xf.shape[0], device=xf.device)
        return weight[:, None] * ((xf[rows, layer_index] - mean[rows, layer_index]) / std[rows, layer_index])

    def _mix(self, xf: Tensor, mean: Tensor, std: Tensor, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (coder input [n, d], arg-max layer [n], its weight [n])."""
        weight, layer_index = probs.max(dim=-1)
        if self.config.routing == "hard":
            return self._pick(xf, mean, std, layer_index, weight), layer_index, weight
        coef = probs[:, None, :] / std.transpose(1, 2)  # sum_i p_i (x_i - mean_i) / std_i
        return torch.bmm(coef, xf).squeeze(1) - (coef.transpose(1, 2) * mean).sum(1), layer_index, weight

    # --- routing ---------------------------------------------------------------------------------
    @torch.no_grad()
    def route(self, x: Tensor) -> Routing:
        """Model space [..., n_layers, d_model] -> Routing(layer_index [...], weight [...], probs [..., n_layers])."""
        x, lead = self._flatten(x)
        probs = self._route_parts(x)[3]
        weight, layer_index = probs.max(dim=-1)
        return Routing(*(self._unflatten(t, lead) for t in (layer_index, weight, probs)))

    def coder_input(self, x: Tensor) -> Tensor:
        """Model space [n, n_layers, d_model] -> [n, d_model], what the coder encodes:
        hard, p * x_norm of the arg-max layer; soft, sum_i p_i * x_norm_i."""
        self._check_input(x, self.n_layers)
        return self._mix(*self._route_parts(x))[0]

    def training_loss(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, auxk_coef: float = 0.0,
        sparsity_coef: float = 0.0,
    ) -> TrainOutput:
        inp, layer_index, _ = self._mix(*self._route_parts(x))
        out = self.coder.forward_train(inp, compute_dtype, dead, self.config.d_model // 2, sparsity_coef)
        share = index_counts(layer_index, self.n_layers).float() / layer_index.numel()
        return self._train_output(out, inp, dead, auxk_coef, {"route_share": share})

    # --- reconstruction (hard routing only) --------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> RoutedReconstruction:
        """Model space [..., n_layers, d_model] -> RoutedReconstruction (x_hat [..., d_model], layer_index
        and weight [...]): per token, the reconstruction
        of its routed layer in model space, x_hat = denorm(decode(encode(p * x_norm)) / p).
        Soft routing mixes layers and has no single layer to put a reconstruction back into: it raises."""
        x, lead = self._flatten(x)
        route = self.route(x)
        return self._unflatten_rec(self.reconstruct_at(x, route.layer_index, route.weight), lead)

    def _unflatten_rec(self, rec: RoutedReconstruction, lead: tuple[int, ...]) -> RoutedReconstruction:
        return RoutedReconstruction(*(self._unflatten(t, lead) for t in rec))

    @torch.no_grad()
    def reconstruct_with_probs(self, x: Tensor, probs: Tensor) -> RoutedReconstruction:
        """As `reconstruct`, with `probs` [n, n_layers] in place of the router's output (random
        baselines): the layer is probs' arg-max (the first on ties) and p its value there. For a
        random layer pass a one-hot row (p = 1) or any row whose maximum sits at that layer.
        Leading dims as `reconstruct` (probs: [..., n_layers])."""
        x, lead = self._flatten(x)
        weight, layer_index = probs.to(self.device).float().reshape(-1, self.n_layers).max(dim=-1)
        return self._unflatten_rec(self.reconstruct_at(x, layer_index, weight), lead)

    @torch.no_grad()
    def reconstruct_at(self, x: Tensor, layer_index: Tensor, weight: Tensor) -> RoutedReconstruction:
        """Reconstruct each token's layer `layer_index` [n] (index into config.layers) with the
        coder's input scaled by `weight` [n]; model space in and out.

        Soft routing mixes all routed layers, so it has a single layer to reconstruct only where the
        mix is one-hot (weight 1: the random-layer baseline); any other weight raises.
        Leading dims as `reconstruct` (layer_index and weight: [...])."""
        x, lead = self._flatten(x)
        layer_index = layer_index.to(self.device).reshape(-1)
        weight = weight.to(self.device).float().reshape(-1)
        if self.config.routing != "hard" and not bool((weight == 1).all()):
            raise RouteSAEError(
                "soft routing has no single layer to reconstruct: its input mixes all routed layers"
            )
        rows = torch.arange(x.shape[0], device=self.device)
        picked = x.to(self.device)[rows, layer_index].float()  # only the reconstructed layer is normalized
        mean, std = self._picked_stats(picked, layer_index)
        inp = weight[:, None] * ((picked - mean) / std)
        out = self.coder.decode_sparse(self.coder.encode_sparse(inp)) / weight[:, None]
        return self._unflatten_rec(RoutedReconstruction(denormalize(out, mean, std), layer_index, weight), lead)

    def export_tensors(self) -> dict[str, Tensor]:
        """SAELens names for the coder, plus `router.weight` [n_layers, d_model]."""
        return {**super().export_tensors(), "router.weight": self.router.weight.detach().clone()}

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        super().load_exported(tensors)
        self.router.weight.copy_(tensors["router.weight"])
