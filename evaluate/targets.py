"""What eval evaluates: a single-layer SAE (any coder), a RouteSAE, or a RouteSAE under a
random-routing baseline.

A `Target` is one row of the report. It turns store activations into the quantities the cache
metrics need (`cache_batch`) and builds the `Splicer` the splice engine runs (`splicer`).

Spaces (as in train/saes/base.py): model space is what the model produced; the coder's space is
after the SAE's normalization, and for RouteSAE hard routing it is p * x_norm of the routed layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from routesae.errors import RouteSAEError
from routesae.evaluate.splice import SplicePlan
from routesae.train.normalize import denormalize

ROUTINGS = ("router", "uniform", "random-layer")
ROUTING_NOTES = {
    "router": "the RouteSAE's own router",
    "uniform": "the paper's random baseline: equal weights 1/n over the n routed layers in place of the router; "
    "under hard routing the tie is broken uniformly at random per token (the same seeded draw as random-layer's), "
    "with p = 1/n",
    "random-layer": "the authors' code's random baseline: a uniformly random routed layer per token, p = 1 "
    "(drawn from the routed layers only, not from all hidden states as that code did)",
}


class CacheBatch(NamedTuple):
    """One batch of (non-special) tokens through a target, for the cache metrics."""

    coder_in: Tensor
    """[n, d] what the coder encodes (normalized space; p * x_norm for hard-routed RouteSAE)."""
    coder_out: Tensor
    """[n, d] the coder's reconstruction of it."""
    x: Tensor | None
    """[n, d] model-space activation a splice would replace (the routed layer's); None for soft routing."""
    x_hat: Tensor | None
    """[n, d] model-space reconstruction that would replace it."""
    values: Tensor
    """[n, k] kept latent activations (after ReLU; zeros do not fire)."""
    indices: Tensor
    """[n, k] their latent indices."""
    layer_index: Tensor | None
    """[n] routed layer as an index into the target's layers (RouteSAE only)."""
    probs: Tensor | None
    """[n, n_layers] routing weights used (RouteSAE only)."""


class Target:
    """One report row: an SAE, or a RouteSAE whose router is replaced by a baseline routing."""

    def __init__(self, name: str, sae: torch.nn.Module, routing: str = "router", seed: int = 0):
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r} not one of {ROUTINGS}")
        self.name = name
        self.sae = sae
        self.config = sae.config
        self.arch: str = sae.config.arch
        self.routing = routing
        self.seed = seed
        if self.arch != "routesae" and routing != "router":
            raise RouteSAEError(f"{name}: random-routing baselines apply to RouteSAE only")
        if self.arch != "routesae" and sae.multi_layer and not self.reads_joint_code:
            raise RouteSAEError(f"{name}: eval does not know the multi-layer architecture {self.arch!r}")

    # --- description ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """hidden_states indices the target reads."""
        return list(self.config.layers)

    reads_joint_code = False
    """True for the targets that evaluate one layer of a multi-layer code (LayerOfJointTarget)."""

    @property
    def written_layers(self) -> list[int]:
        """hidden_states indices a splice replaces (a single-layer SAE's one layer; a RouteSAE's all)."""
        return self.layers

    @property
    def routed(self) -> bool:
        return self.arch == "routesae"

    @property
    def one_layer_per_token(self) -> bool:
        """Whether each token's coder input is one layer's (times p): every single-layer SAE, hard
        routing, and the random-layer baseline even of a soft-routed SAE (its mix is one-hot, p = 1)."""
        return not self.routed or self.config.routing == "hard" or self.routing == "random-layer"

    @property
    def can_splice(self) -> bool:
        return self.one_layer_per_token

    @property
    def cannot_splice_reason(self) -> str:
        return ("soft routing mixes all routed layers into one input, so its reconstruction has no single layer "
                "to be spliced into: no splice metrics (the cache metrics are valid)")

    @property
    def device(self) -> torch.device:
        return next(self.sae.parameters()).device

    # --- routing -------------------------------------------------------------------------------
    def _routing(self, x: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [n, n_layers, d] model space; token_ids [n] global store indices (for random-layer)
        -> (layer_index [n], weight [n], probs [n, n_layers])."""
        n, n_layers = x.shape[0], x.shape[1]
        dev = self.device
        if self.routing == "router":
            r = self.sae.route(x)
            return r.layer_index, r.weight, r.probs
        if self.routing == "uniform":
            # every layer ties at 1/n: an arg-max would send every token to the first routed layer,
            # so the tie is broken at random per token, p staying 1/n
            probs = torch.full((n, n_layers), 1.0 / n_layers, device=dev)
            layer_index = random_layers(token_ids, n_layers, self.seed).to(dev)
            return layer_index, probs[:, 0].clone(), probs
        else:
            probs = torch.zeros(n, n_layers, device=dev)
            probs[torch.arange(n, device=dev), random_layers(token_ids, n_layers, self.seed).to(dev)] = 1.0
        # the same rule as RouteSAE.reconstruct_with_probs: arg-max (first on ties), p its value
        weight, layer_index = probs.max(dim=-1)
        return layer_index, weight, probs

    # --- cache metrics -------------------------------------------------------------------------
    @torch.no_grad()
    def cache_batch(self, acts: dict[int, Tensor], token_ids: Tensor) -> CacheBatch:
        """acts: layer -> [n, d] model-space activations of the same n tokens (non-special)."""
        sae, dev = self.sae, self.device
        coder = sae.coder
        if not self.routed:
            x = acts[self.layers[0]].to(dev).float()
            x_norm, mean, std = sae.normalize_input(x)
            lat = coder.encode_sparse(x_norm)
            out = coder.decode_sparse(lat)
            return CacheBatch(x_norm, out, x, denormalize(out, mean, std), lat.values, lat.indices, None, None)
        x = torch.stack([acts[layer].to(dev).float() for layer in self.layers], dim=1)
        layer_index, weight, probs = self._routing(x, token_ids)
        x_norm, mean, std = sae.normalize_input(x)
        rows = torch.arange(x.shape[0], device=dev)
        if self.one_layer_per_token:
            inp = weight[:, None] * x_norm[rows, layer_index]
        else:  # soft: the mix of all routed layers (the router's or the uniform probs)
            inp = torch.bmm(probs[:, None, :], x_norm).squeeze(1)
        del x_norm
        lat = coder.encode_sparse(inp)
        out = coder.decode_sparse(lat)
        if not self.one_layer_per_token:
            return CacheBatch(inp, out, None, None, lat.values, lat.indices, layer_index, probs)
        x_hat = denormalize(out / weight[:, None], mean[rows, layer_index], std[rows, layer_index])
        return CacheBatch(inp, out, x[rows, layer_index], x_hat, lat.values, lat.indices, layer_index, probs)

    # --- splicing ------------------------------------------------------------------------------
    def splicer(self) -> "TargetSplicer":
        if not self.can_splice:
            raise RouteSAEError(self.cannot_splice_reason)
        return TargetSplicer(self)


def random_layers(token_ids: Tensor, n_layers: int, seed: int) -> Tensor:
    """A uniformly random routed layer per store token, a pure function of (token index, seed), so
    the cache metrics and the splice of the random-layer baseline pick the same layer for a token."""
    # splitmix64-style integer hash (kept within int64 by masking), then modulo the layer count
    z = (token_ids.long().cpu() + (seed + 1) * 0x9E3779B97F4A7C15 % (1 << 62)) & ((1 << 62) - 1)
    z = ((z ^ (z >> 31)) * 0x5851F42D4C957F2D) & ((1 << 62) - 1)
    z = ((z ^ (z >> 29)) * 0x14057B7EF767814F) & ((1 << 62) - 1)
    z = z ^ (z >> 32)
    return z % n_layers


class TargetSplicer:
    """Splices a target's reconstruction into the model (the engine's `Splicer`).

    TopK: every non-special position of its layer. RouteSAE (hard): each non-special token once, at
    the layer its routing picked from the clean activations, with the reconstruction of p * x_norm
    divided back by p; the activation reconstructed is the live one at that layer (later layers see
    earlier replacements), exactly what training fed the coder apart from that."""

    def __init__(self, target: Target):
        self.target = target
        self.name = target.name

    def clean_layers(self) -> list[int]:
        return self.target.layers

    def plan(self, clean: dict[int, Tensor], keep: Tensor, token_ids: Tensor) -> SplicePlan:
        t = self.target
        if not t.routed:
            layer = t.layers[0]
            return SplicePlan({layer: keep}, self._replace_topk)
        b, s = keep.shape
        flat_keep = keep.reshape(-1)
        where = flat_keep.nonzero().squeeze(1)
        x = torch.stack([clean[layer].reshape(b * s, -1)[where].float() for layer in t.layers], dim=1)
        layer_index, weight, _ = t._routing(x, token_ids.reshape(-1)[where.to(token_ids.device)])
        # per flat position: routed layer (-1 where special) and p
        full_index = torch.full((b * s,), -1, dtype=torch.long, device=keep.device)
        full_index[where] = layer_index.to(keep.device)
        full_weight = torch.ones(b * s, device=keep.device)
        full_weight[where] = weight.to(keep.device).float()
        masks = {layer: (full_index == i).view(b, s) for i, layer in enumerate(t.layers)}
        return SplicePlan(masks, self._routed_replace(full_weight))

    def _replace_topk(self, layer: int, x: Tensor, idx: Tensor) -> Tensor:
        return self.target.sae.reconstruct(x.float()).to(x.dtype)

    def _routed_replace(self, full_weight: Tensor) -> Callable[[int, Tensor, Tensor], Tensor]:
        t = self.target
        n_layers = len(t.layers)

        def replace(layer: int, x: Tensor, idx: Tensor) -> Tensor:
            i = t.layers.index(layer)
            n = x.shape[0]
            # reconstruct_at reads the layer slot the index names; every slot holds the live x, and
            # with per-layer normalization only that slot's statistics enter the result
            stack = x.float().unsqueeze(1).expand(n, n_layers, x.shape[-1])
            index = torch.full((n,), i, dtype=torch.long, device=x.device)
            rec = t.sae.reconstruct_at(stack, index, full_weight[idx])
            return rec.x_hat.to(x.dtype)

        return replace


class LayerOfJointTarget(Target):
    """One layer of an SAE that reads several layers into one code and writes each back (the
    crosscoder): the code comes from the clean activations of all its layers, and only `layer`'s
    reconstruction is scored and spliced in (later layers run on the modified stream). Splicing
    every layer at once would leave only the deepest layer's replacement to be seen."""

    reads_joint_code = True

    def __init__(self, name: str, sae: torch.nn.Module, layer: int, codes: "JointCodes | None" = None):
        """codes: shared by the targets of one SAE's layers, so a batch is encoded once for all of them."""
        super().__init__(name, sae)
        self.layer = layer
        self.position = sae.config.layers.index(layer)
        self.codes = codes or JointCodes()

    @property
    def written_layers(self) -> list[int]:
        return [self.layer]

    @property
    def can_splice(self) -> bool:
        return True

    @torch.no_grad()
    def _parts(self, sources: list[Tensor], keep: Tensor | None = None) -> tuple[Tensor, ...]:
        """sources: each layer's model-space activations ([n, d], or [batch, seq, d] with `keep`
        [batch, seq] naming the positions to encode) -> (this layer's coder input and output slices
        in the normalized space, its model-space reconstruction, the code's values and indices, the
        layer's activations), for those rows in order."""
        sae, i = self.sae, self.position

        def encode() -> tuple[Tensor, ...]:
            flat = [src.reshape(-1, src.shape[-1]) for src in sources]
            if keep is not None:
                rows = keep.reshape(-1).nonzero().squeeze(1).to(flat[0].device)
                flat = [src[rows] for src in flat]
            x = torch.stack([src.to(self.device).float() for src in flat], dim=1)
            x_norm, mean, std = sae.normalize_input(x)
            lat = sae.coder.encode_sparse(x_norm.reshape(x.shape[0], -1))
            return x, x_norm, mean, std, sae.coder.decode_sparse(lat).view_as(x_norm), lat.values, lat.indices

        x, x_norm, mean, std, out, values, indices = self.codes.get([*sources, keep], encode)
        return x_norm[:, i], out[:, i], denormalize(out[:, i], mean[:, i], std[:, i]), values, indices, x[:, i]

    @torch.no_grad()
    def cache_batch(self, acts: dict[int, Tensor], token_ids: Tensor) -> CacheBatch:
        coder_in, coder_out, x_hat, values, indices, x = self._parts([acts[layer] for layer in self.layers])
        return CacheBatch(coder_in, coder_out, x, x_hat, values, indices, None, None)

    def splicer(self) -> "JointLayerSplicer":
        return JointLayerSplicer(self)


class JointLayerSplicer(TargetSplicer):
    """Splices one layer of a crosscoder's reconstruction, computed from all its clean layers."""

    target: LayerOfJointTarget

    def plan(self, clean: dict[int, Tensor], keep: Tensor, token_ids: Tensor) -> SplicePlan:
        t = self.target
        b, s = keep.shape
        where = keep.reshape(-1).nonzero().squeeze(1)
        rows = torch.zeros(b * s, t.config.d_model, device=keep.device)
        rows[where] = t._parts([clean[layer] for layer in t.layers], keep)[2].to(keep.device)

        def replace(layer: int, x_live: Tensor, idx: Tensor) -> Tensor:
            # earlier layers are clean in this pass, so the live activation here is the clean one
            return rows[idx].to(x_live.device, x_live.dtype)

        return SplicePlan({t.layer: keep}, replace)


class JointCodes:
    """The last batch's code of a crosscoder, shared by its per-layer targets: each would otherwise
    encode all the layers again (16 times the work for 16 layers). The batch is recognised by the
    identity of its tensors, which are kept referenced, so no later tensor can take their place."""

    def __init__(self) -> None:
        self._inputs: list | None = None
        self._value: tuple | None = None

    def get(self, inputs: list, compute: Callable[[], tuple]) -> tuple:
        same = self._inputs is not None and len(inputs) == len(self._inputs) and all(
            a is b for a, b in zip(inputs, self._inputs))
        if not same:
            self._inputs, self._value = None, None  # free the last batch's before computing this one's
            self._value = compute()
            self._inputs = list(inputs)
        return self._value
