"""Steering, clamping and ablation of SAE latents inside a running model, generation included.

    with steering(model, sae, [Edit(1234, "set", 20.0)]):
        out = model.generate(ids, max_new_tokens=64)

An edit changes latents of the SAE's code z of the residual stream and puts back only the change,
keeping the SAE's error term (SAELens `use_error_term`, SAEBench's clamp):

    x' = x + decode(z') - decode(z)        (model space: the normalization undone)

so an edit that changes nothing changes nothing, bit for bit: the change is computed in float32 and
added (in float32, rounded once to the model's dtype) only to the positions where z' differs from
z; every other position keeps its very bytes. The decoders are linear, so decode(z') - decode(z) is
(z' - z) @ W_dec, which is what is computed (only for the edited latents' columns). Under
per-token normalization the change is scaled back to model space by the token's own std (the mean
cancels); under 'dataset' by 1/scale.

Edits apply on every forward (model/residual.py): the prefill, each key-value-cached one-token step
and uncached re-runs, with the positions rule read from absolute positions, never from a call's
length. Architectures:
- single-layer SAEs: hidden_states[layer] is edited.
- RouteSAE (hard routing): each position is edited at its own routed layer. The router reads the
  routed layers, deeper than most of them, so each forward first runs a clean pass (the unedited
  model with its own KV cache, up to the deepest routed layer) to route the call's tokens, as the
  router was trained: on the model's own activations of the text. The edited pass then edits each
  position at its layer, the code read from the live activation there times the routing weight p,
  the change divided by p as `reconstruct_at` does. Cost: the blocks up to the deepest routed
  layer run twice per forward, and a second KV cache for them is kept.
- MLSAE: the one dictionary reads every routed layer on its own, so an edit applies to each layer's
  own code at every routed layer (a layer's code is read after the shallower layers' edits: 'set'
  clamps again, 'add' adds again).
- crosscoders, soft-routed RouteSAEs: refused (no layer can be edited before the deepest has run;
  soft routing has no single layer to edit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from routesae.errors import RouteSAEError
from routesae.interpret.choices import MODES, POSITIONS, WHERES
from routesae.model.residual import CleanPass, EditFn, ForwardCall, ResidualEditor
from routesae.train.normalize import apply_normalization


@dataclass(frozen=True)
class Edit:
    """One change to one latent."""

    latent: int
    """Index of the latent (0 .. n_latents-1)."""
    mode: str = "set"
    """'set' (clamp to value), 'add' (value added), 'mul' (times value), 'zero' (ablation, value unused)."""
    value: float = 0.0
    """The number set, added or multiplied by."""
    where: str = "all"
    """'all': every position the positions rule allows; 'active': only where the latent already fires (> 0)."""
    positions: str = "all"
    """'all', 'prompt' (the prompt's tokens) or 'generated' (tokens generate produced; none outside generate)."""

    def describe(self) -> str:
        what = {"set": f"set to {self.value:g}", "add": f"{self.value:+g}", "mul": f"x{self.value:g}",
                "zero": "zeroed"}[self.mode]
        return f"latent {self.latent} {what} (where {self.where}, positions {self.positions})"


def check_edits(edits: list[Edit], n_latents: int) -> list[Edit]:
    """The edits, or a RouteSAEError naming the first bad one."""
    if not edits:
        raise RouteSAEError("no edit given")
    for e in edits:
        if isinstance(e.latent, bool) or not isinstance(e.latent, int) or not 0 <= e.latent < n_latents:
            raise RouteSAEError(f"latent {e.latent} out of range: this SAE has latents 0..{n_latents - 1}")
        if e.mode not in MODES:
            raise RouteSAEError(f"unknown mode {e.mode!r}: use one of {', '.join(MODES)}")
        if e.where not in WHERES:
            raise RouteSAEError(f"unknown where {e.where!r}: use one of {', '.join(WHERES)}")
        if e.positions not in POSITIONS:
            raise RouteSAEError(f"unknown positions {e.positions!r}: use one of {', '.join(POSITIONS)}")
        if isinstance(e.value, bool) or not isinstance(e.value, (int, float)) or not math.isfinite(e.value):
            raise RouteSAEError(f"value {e.value!r} of latent {e.latent} is not a finite number")
    return list(edits)


def _position_rule(rule: str, in_prompt: Tensor) -> Tensor:
    if rule == "all":
        return torch.ones_like(in_prompt)
    return in_prompt if rule == "prompt" else ~in_prompt


def code_change(z: Tensor, edits: list[Edit], in_prompt: Tensor) -> tuple[list[int], Tensor]:
    """z [n, n_latents] float32, in_prompt [n] bool -> (the edited latents, z'[:, those] - z[:, those]).

    Edits apply in order (two on one latent compose); 'active' reads the unedited z. The change is
    exactly 0 wherever z' equals z (x - x is 0 in floating point), which is what keeps no-op edits
    bit-identical."""
    cols = sorted({e.latent for e in edits})
    old = z[:, cols]
    new = old.clone()
    for e in edits:
        j = cols.index(e.latent)
        sel = _position_rule(e.positions, in_prompt)
        if e.where == "active":
            sel = sel & (old[:, j] > 0)
        col = new[:, j]
        if e.mode == "set":
            val = torch.full_like(col, float(e.value))
        elif e.mode == "add":
            val = col + float(e.value)
        elif e.mode == "mul":
            val = col * float(e.value)
        else:
            val = torch.zeros_like(col)
        new[:, j] = torch.where(sel, val, col)
    return cols, new - old


def check_steerable(sae: torch.nn.Module) -> None:
    """Raises RouteSAEError for the architectures that cannot be steered (see the module)."""
    if hasattr(sae, "route"):
        if sae.config.routing != "hard":
            raise RouteSAEError("a soft-routed RouteSAE mixes all routed layers: it has no single layer to steer")
    elif getattr(sae, "multi_layer", False) and not hasattr(sae, "at_layer"):
        raise RouteSAEError(
            f"steering a {sae.config.arch} is not supported: its one code is read from all its layers at once, so "
            "no layer can be edited before the deepest has run; steer a single-layer SAE, a RouteSAE or an MLSAE"
        )


class CallRecord(NamedTuple):
    """What the edits did in one forward."""

    index: int
    """The forward's number since steering began."""
    start: int
    """Absolute position of its first token (0: a prefill or an uncached re-run)."""
    length: int
    """Its tokens per sequence (1: a cached one-token step)."""
    edited: int
    """(position, layer) pairs whose residual it changed, over the batch."""


class Steerer:
    """The hooks of one set of edits on one model (a context manager; see `steering`)."""

    def __init__(self, model: torch.nn.Module, sae: torch.nn.Module, edits: list[Edit]):
        self.sae = sae
        self.edits = check_edits(list(edits), sae.config.n_latents)
        self.records: list[CallRecord] = []
        """One per forward while entered."""
        self.clean_pass: CleanPass | None = None
        """RouteSAE's routing pass (None for the others)."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        d_model = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
        if d_model and d_model != sae.config.d_model:
            raise RouteSAEError(f"the SAE reads d_model {sae.config.d_model}, the model's residual stream is {d_model}")
        check_steerable(sae)
        self._cols = sorted({e.latent for e in self.edits})
        self._w_dec = sae.coder.W_dec.detach()[self._cols].float()  # [n_edited, width]
        if hasattr(sae, "route"):
            fns = {layer: self._routed_edit(i) for i, layer in enumerate(sae.config.layers)}
            self.editor = ResidualEditor(model, fns, self._route)
            self.clean_pass = CleanPass(self.editor, list(sae.config.layers))
        elif hasattr(sae, "at_layer"):  # MLSAE: each layer's own code
            fns = {layer: self._layer_edit(sae.at_layer(layer)) for layer in sae.config.layers}
            self.editor = ResidualEditor(model, fns, self._note)
        else:
            self.editor = ResidualEditor(model, {sae.config.layers[0]: self._layer_edit(sae)}, self._note)

    # --- the context manager ----------------------------------------------------------------------
    def __enter__(self) -> "Steerer":
        self.editor.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.editor.__exit__(*exc)

    @property
    def prompt_len(self) -> int | None:
        """The prompt's length: set by `model.generate` for its duration; set it by hand for forwards of
        your own (None: every position is the prompt's)."""
        return self.editor.prompt_len

    @prompt_len.setter
    def prompt_len(self, n: int | None) -> None:
        self.editor.prompt_len = n

    # --- per forward ------------------------------------------------------------------------------
    def _note(self, call: ForwardCall) -> None:
        self.records.append(CallRecord(call.index, call.past, int(call.positions.numel()), 0))

    def _count(self, call: ForwardCall, n: int) -> None:
        r = self.records[-1]
        self.records[-1] = r._replace(edited=r.edited + n)

    def _route(self, call: ForwardCall) -> None:
        """RouteSAE: route the call's tokens from the clean routed layers."""
        self._note(call)
        if call.cache is None and not self._eligible(call).any():
            call.state["route"] = None  # nothing to edit, and no clean cache to keep in step
            return
        states = self.clean_pass.states(call)
        x = torch.stack([states[layer] for layer in self.sae.config.layers], dim=2)  # [b, s, n_layers, d]
        route = self.sae.route(x)
        call.state["route"] = (route.layer_index.reshape(-1), route.weight.reshape(-1))

    def _eligible(self, call: ForwardCall) -> Tensor:
        """[s] bool: positions some edit's positions rule allows."""
        in_prompt = call.in_prompt
        allowed = torch.zeros_like(in_prompt)
        for e in self.edits:
            allowed |= _position_rule(e.positions, in_prompt)
        return allowed

    def _apply(self, h: Tensor, call: ForwardCall, rows: Tensor, code_in: Any) -> Tensor | None:
        """The edited hidden state, or None where nothing changed.

        rows: [m] flat indices into h's [b * s] positions to consider; code_in(x [m, d] float32) ->
        (coder input [m, width], factor [m, 1]) where factor takes a change in the coder's space back
        to model space."""
        if rows.numel() == 0:
            return None
        b, s, d = h.shape
        flat = h.reshape(-1, d)
        x = flat[rows].to(self.sae.device).float()
        inp, factor = code_in(x)
        z = self.sae.coder.encode(inp)
        in_prompt = call.in_prompt.to(rows.device).repeat(b)[rows]
        cols, dz = code_change(z, self.edits, in_prompt.to(z.device))
        changed = (dz != 0).any(dim=1)
        n = int(changed.sum())
        if n == 0:
            return None
        delta = (dz[changed] @ self._w_dec) * factor[changed]
        where = rows[changed.to(rows.device)]
        out = flat.clone()  # never write into a tensor the model may still read
        out[where] = (flat[where].float() + delta.to(flat.device)).to(flat.dtype)
        self._count(call, n)
        return out.view_as(h)

    def _layer_edit(self, sae: torch.nn.Module) -> EditFn:
        """A single-layer SAE (or one layer of an MLSAE) at its layer."""

        def code_in(x: Tensor) -> tuple[Tensor, Tensor]:
            x_norm, _, std = sae.normalize_input(x)
            return x_norm, std.expand(x.shape[0], 1)

        def fn(h: Tensor, call: ForwardCall) -> Tensor | None:
            allowed = self._eligible(call).repeat(h.shape[0])
            return self._apply(h, call, allowed.nonzero().squeeze(1), code_in)

        return fn

    def _routed_edit(self, i: int) -> EditFn:
        """RouteSAE at its routed layer i (index into config.layers): the positions routed there."""
        sae = self.sae
        scale = sae.dataset_scale[i]

        def fn(h: Tensor, call: ForwardCall) -> Tensor | None:
            route = call.state.get("route")
            if route is None:
                return None
            layer_index, weight = route
            allowed = self._eligible(call).to(layer_index.device).repeat(h.shape[0]) & (layer_index == i)
            rows = allowed.nonzero().squeeze(1)
            p = weight[rows][:, None]

            def code_in(x: Tensor) -> tuple[Tensor, Tensor]:
                # as RouteSAE.reconstruct_at: the coder reads p * x_norm of this layer, its output is divided by p
                x_norm, _, std = apply_normalization(x, sae.config.normalization, scale)
                return p * x_norm, std.expand(x.shape[0], 1) / p

            return self._apply(h, call, rows.to(h.device), code_in)

        return fn


def steering(model: torch.nn.Module, sae: torch.nn.Module, edits: list[Edit]) -> Steerer:
    """Edits of `sae`'s latents applied to `model` on every forward while the result is entered:

        with steering(model, sae, [Edit(1234, "set", 20.0)]) as st:
            out = model.generate(ids, max_new_tokens=64)
        st.records    # per forward: start position, length, positions edited

    Raises RouteSAEError for a latent out of range, a value that is not a finite number, an SAE of
    another width than the model, or an architecture that cannot be steered (see the module)."""
    return Steerer(model, sae, edits)


# --- baseline against steered generation -----------------------------------------------------------
@dataclass
class GenerationSettings:
    """Decoding settings, the same for the baseline and the steered run."""

    max_new_tokens: int = 64
    """Tokens to generate (fewer where the model ends its text)."""
    sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (with sample)."""
    top_p: float = 1.0
    """Nucleus sampling mass (with sample)."""
    seed: int = 0
    """Seeds torch before each run, so both sample alike."""
    use_cache: bool = True
    """Generate with the key-value cache (off: every step re-runs the whole sequence)."""


class Continuation(NamedTuple):
    """One run's generated tokens."""

    token_ids: list[int]
    """The new tokens, after the prompt."""
    text: str
    """Their decoded text."""


class FirstStep(NamedTuple):
    """The first forward of the steered generation that an edit changed, against the baseline's
    same forward (the same tokens: nothing differs before it)."""

    kind: str
    """'prefill' (the prompt's forward), 'step' (a one-token step) or 'none' (no edit ever changed anything)."""
    positions: list[int]
    """The forward's positions."""
    token_ids: list[int]
    """Its input tokens."""
    kl: list[float]
    """Per token, KL(baseline || steered) of the next-token distributions, nats."""


class Comparison(NamedTuple):
    """A prompt continued without and with the edits."""

    prompt: str
    prompt_ids: list[int]
    baseline: Continuation
    steered: Continuation
    first_step: FirstStep
    records: list[CallRecord]
    """The steered generation's forwards."""


def _generate(model: torch.nn.Module, ids: Tensor, settings: GenerationSettings, pad_id: int | None) -> list[int]:
    from transformers import GenerationConfig

    base = model.generation_config
    opts: dict[str, Any] = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                            "top_k": 0} if settings.sample else {"do_sample": False}
    cfg = GenerationConfig(max_new_tokens=settings.max_new_tokens, eos_token_id=base.eos_token_id,
                           bos_token_id=base.bos_token_id,
                           pad_token_id=base.pad_token_id if base.pad_token_id is not None else pad_id,
                           use_cache=settings.use_cache, **opts)
    torch.manual_seed(settings.seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[0, ids.shape[1]:].tolist()


def _kl(p_logits: Tensor, q_logits: Tensor) -> list[float]:
    lp = torch.log_softmax(p_logits.double(), dim=-1)
    lq = torch.log_softmax(q_logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).tolist()


def _first_step(model: torch.nn.Module, sae: torch.nn.Module, edits: list[Edit], tokens: list[int], prompt_len: int,
                records: list[CallRecord]) -> FirstStep:
    first = next((r for r in records if r.edited), None)
    if first is None:
        return FirstStep("none", [], [], [])
    # Teacher-forced on the baseline's tokens, uncached, once without and once with the edits: up to
    # this forward the steered run fed exactly these tokens.
    stop = first.start + first.length
    device = next(model.parameters()).device
    ids = torch.tensor([tokens[:stop]], device=device)
    with torch.no_grad():
        clean = model(input_ids=ids, use_cache=False).logits[0, first.start:stop]
        with steering(model, sae, edits) as st:
            st.prompt_len = prompt_len
            steered = model(input_ids=ids, use_cache=False).logits[0, first.start:stop]
    kind = "prefill" if first.index == 0 else "step"
    return FirstStep(kind, list(range(first.start, stop)), tokens[first.start:stop], _kl(clean, steered))


def compare(model: torch.nn.Module, tokenizer: Any, sae: torch.nn.Module, edits: list[Edit], prompt: str,
            settings: GenerationSettings) -> Comparison:
    """Continue `prompt` without and with the edits, with the same settings and seed."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    if ids.shape[1] == 0:
        raise RouteSAEError(f"the prompt {prompt!r} has no tokens")
    ids = ids.to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    baseline = _generate(model, ids, settings, pad)
    with steering(model, sae, edits) as st:
        steered = _generate(model, ids, settings, pad)
    prompt_ids = ids[0].tolist()
    first = _first_step(model, sae, edits, prompt_ids + baseline, len(prompt_ids), st.records)

    def cont(t: list[int]) -> Continuation:
        return Continuation(t, tokenizer.decode(t, skip_special_tokens=False))

    return Comparison(prompt, prompt_ids, cont(baseline), cont(steered), first, st.records)
