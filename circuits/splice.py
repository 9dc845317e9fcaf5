"""The model with SAEs spliced at spaced layers and a mask over their latents: one forward with
every hook (model/residual.py's ResidualEditor), the logit-difference metric, and the per-position
means over the patch prompts that an ablated latent (and the mean-ablated error term) takes.

At each SAE layer L, hidden_states[L] becomes, in float32 and fed back in the model's dtype,

    decode(mu + m * (z - mu)) + error        (model space: the SAE's normalization undone)

with z the live code of the forward (so a later layer's z reads the earlier layers' edits), mu the
patch mean of z at that position ('mean' ablation) or 0 ('zero'), m the mask in [0, 1], and error
x - decode(z) of the same forward ('kept'), its patch mean ('mean', the default) or 0 ('dropped').
The BOS position is never edited (no SAE at BOS). Masks are indexed by position counted from the
end of the prompt (row -1 is the last token, where the metric is read), so prompts of several
token lengths share one mask; a mask with one row (`shared positions`) applies at every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from routesae.errors import RouteSAEError
from routesae.model.residual import ForwardCall, ResidualEditor
from routesae.train.normalize import denormalize
from torch import Tensor

ERROR_MODES = ("mean", "kept", "dropped")
ABLATIONS = ("mean", "zero")


class PairBatch(NamedTuple):
    """Clean/patch prompt pairs of one token length (BOS included), so positions align."""

    clean: Tensor
    """[b, s] int64 token ids of the clean prompts."""
    patch: Tensor
    """[b, s] int64 token ids of the patch prompts."""
    clean_answer: Tensor
    """[b] int64 the clean answer's token."""
    patch_answer: Tensor
    """[b] int64 the patch answer's token."""


class Means(NamedTuple):
    """Per-position means over the patch prompts of one token length (positions 1..s-1)."""

    z: dict[int, Tensor]
    """layer -> [s-1, n_latents] float32 mean code."""
    error: dict[int, Tensor]
    """layer -> [s-1, d_model] float32 mean error term x - decode(z)."""


def logit_diff(logits: Tensor, batch: PairBatch) -> Tensor:
    """[b, vocab] last-position logits -> [b] clean answer minus patch answer."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.clean_answer.to(logits.device)] - logits[rows, batch.patch_answer.to(logits.device)]


def differentiable_code(sae: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Model space [n, d] -> (z [n, n_latents], mean, std), with autograd (sae.encode is no_grad)."""
    x_norm, mean, std = sae.normalize_input(x)
    return sae.coder.encode(x_norm), mean, std


def decode_model_space(sae: Any, z: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """[n, n_latents] -> [n, d] float32 reconstruction in model space, with autograd."""
    return denormalize(sae.coder.decode(z), mean, std)


def _code_past_first(sae: Any, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A hook's hidden state [b, s + 1, d] -> its positions after the first (never spliced)
    flattened [b * s, d], their code [b, s, n_latents], and the normalization's mean and std."""
    x = hidden[:, 1:]
    flat = x.reshape(-1, x.shape[-1])
    z, mean, std = differentiable_code(sae, flat)
    return flat, z.view(x.shape[0], x.shape[1], -1), mean, std


def _rows(mask: Tensor, n_pos: int) -> Tensor:
    """The mask rows for a prompt with `n_pos` edited positions: [n_pos or 1, n_latents]."""
    if mask.shape[0] == 1:
        return mask
    if mask.shape[0] < n_pos:
        raise RouteSAEError(f"a prompt has {n_pos} positions after BOS but the mask covers only {mask.shape[0]}")
    return mask[mask.shape[0] - n_pos:]


@dataclass
class CircuitModel:
    """A frozen causal LM with single-layer SAEs at spaced layers (hidden_states indices)."""

    model: torch.nn.Module
    """The transformers causal LM (frozen here: requires_grad_(False))."""
    saes: list[Any]
    """Single-layer SAEs, one per layer, in increasing layer order (frozen here)."""
    error: str = "mean"
    """The SAEs' error terms: 'mean' (patch mean), 'kept' (from the same forward) or 'dropped'."""
    ablation: str = "mean"
    """What an off latent takes: 'mean' (its patch mean at that position) or 'zero'."""

    def __post_init__(self) -> None:
        if self.error not in ERROR_MODES:
            raise RouteSAEError(f"unknown error mode {self.error!r}: use one of {', '.join(ERROR_MODES)}")
        if self.ablation not in ABLATIONS:
            raise RouteSAEError(f"unknown ablation {self.ablation!r}: use one of {', '.join(ABLATIONS)}")
        for sae in self.saes:
            if getattr(sae, "multi_layer", False) or len(sae.config.layers) != 1:
                raise RouteSAEError(f"circuits need single-layer SAEs; {sae.config.arch} reads layers {sae.config.layers}")
        self.saes = sorted(self.saes, key=lambda s: s.config.layers[0])
        self.layers = [int(s.config.layers[0]) for s in self.saes]
        if len(set(self.layers)) != len(self.layers):
            raise RouteSAEError(f"two SAEs read the same layer ({self.layers}): give one SAE per layer")
        d_model = getattr(getattr(self.model, "config", None), "hidden_size", None)
        for sae in self.saes:
            if d_model is not None and int(sae.config.d_model) != int(d_model):
                raise RouteSAEError(f"an SAE of layer {sae.config.layers[0]} reads d_model {sae.config.d_model}, "
                                    f"the model has {d_model}: not this model's SAE")
        self.model.requires_grad_(False)
        for sae in self.saes:
            sae.requires_grad_(False)
        self.by_layer = dict(zip(self.layers, self.saes))
        self.n_latents = {layer: int(s.config.n_latents) for layer, s in self.by_layer.items()}
        self.device = next(self.model.parameters()).device

    # --- means over the patch prompts ------------------------------------------------------------
    @torch.no_grad()
    def means(self, patch: Tensor) -> Means:
        """Per-position means of z and of the error term over `patch` [b, s], read from the
        unedited model's own forward (the "true" means: no layer is edited while reading)."""
        zs: dict[int, Tensor] = {}
        errs: dict[int, Tensor] = {}

        def reader(layer: int):
            sae = self.by_layer[layer]

            def fn(hidden: Tensor, call: ForwardCall) -> None:
                flat, z, mean, std = _code_past_first(sae, hidden)
                err = flat.float() - decode_model_space(sae, z.flatten(0, 1), mean, std)
                zs[layer] = z.mean(0)
                errs[layer] = err.view(z.shape[0], z.shape[1], -1).mean(0)

            return fn

        with ResidualEditor(self.model, {layer: reader(layer) for layer in self.layers}):
            self.model(input_ids=patch.to(self.device), logits_to_keep=1)
        return Means(zs, errs)

    # --- the spliced forward ---------------------------------------------------------------------
    def logits(
        self,
        ids: Tensor,
        means: Means,
        masks: dict[int, Tensor] | None = None,
        override: dict[int, Tensor] | None = None,
        delta: dict[int, Tensor] | None = None,
        capture: dict[int, Tensor] | None = None,
    ) -> Tensor:
        """Last-position logits [b, vocab] (float32) of `ids` [b, s] with the SAEs spliced.

        masks: layer -> [P or 1, n_latents] in [0, 1] (rows counted from the end; missing: all on).
        override: layer -> [b, s-1, n_latents] code used instead of the live one (IG's path).
        delta: layer -> [b, s-1, n_latents] added to the code used (zeros with requires_grad: the
        gradient of the metric with respect to that layer's code, through the later layers).
        capture: filled with layer -> [b, s-1, n_latents] the live code of the forward."""
        masks, override, delta = masks or {}, override or {}, delta or {}

        def editor(layer: int):
            sae = self.by_layer[layer]

            def fn(hidden: Tensor, call: ForwardCall) -> Tensor:
                flat, z, mean, std = _code_past_first(sae, hidden)
                b, s, d = z.shape[0], z.shape[1], flat.shape[1]
                if capture is not None:
                    capture[layer] = z.detach()
                used = override.get(layer, z)
                if layer in masks:
                    m = _rows(masks[layer], s)
                    if self.ablation == "mean":
                        mu = means.z[layer]
                        used = mu + m * (used - mu)
                    else:
                        used = m * used
                if layer in delta:
                    used = used + delta[layer]
                recon = decode_model_space(sae, used.reshape(b * s, -1), mean, std)
                if self.error == "kept":
                    recon = recon + (flat.float() - decode_model_space(sae, z.reshape(b * s, -1), mean, std))
                elif self.error == "mean":
                    recon = recon + means.error[layer].unsqueeze(0).expand(b, s, d).reshape(b * s, d)
                new = recon.view(b, s, d).to(hidden.dtype)
                return torch.cat([hidden[:, :1], new], dim=1)

            return fn

        with ResidualEditor(self.model, {layer: editor(layer) for layer in self.layers}):
            out = self.model(input_ids=ids.to(self.device), logits_to_keep=1)
        return out.logits[:, -1].float()

    def metric(self, batch: PairBatch, means: Means, **kwargs: Any) -> Tensor:
        """[b] logit difference of the clean prompts with the SAEs spliced (kwargs: see `logits`)."""
        return logit_diff(self.logits(batch.clean, means, **kwargs), batch)

    def unspliced_metric(self, batch: PairBatch) -> Tensor:
        """[b] logit difference of the clean prompts in the plain model (no SAE)."""
        with torch.no_grad():
            out = self.model(input_ids=batch.clean.to(self.device), logits_to_keep=1)
        return logit_diff(out.logits[:, -1].float(), batch)

    def full_masks(self, n_pos: int, value: float = 1.0) -> dict[int, Tensor]:
        """Masks of every layer all `value` (1: the model with SAEs spliced; 0: all ablated)."""
        return {layer: torch.full((n_pos, n), value, device=self.device) for layer, n in self.n_latents.items()}
