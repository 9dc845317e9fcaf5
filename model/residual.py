"""Edit a causal LM's residual stream on every forward pass, generation included.

`ResidualEditor(model, {layer: fn})` hooks Hugging Face hidden_states index `layer` (the output of
decoder block layer-1; 0 is the embeddings, the input of block 0) and lets `fn` replace it. The
hooks fire on every forward: a plain `model(ids)`, the prefill of `model.generate` and each of its
key-value-cached one-token steps, and the full re-runs of an uncached `generate`.

Each forward is one `ForwardCall` whose tokens sit at absolute positions past .. past+s-1, where
past is what the model's KV cache held before the call (0 without a cache: the call then holds the
whole sequence). Prefill, cached steps and uncached re-runs are told apart only by these positions;
nothing here decides whether to edit from a call's length (the usual bug that leaves generated
tokens unedited). Inside `model.generate` the editor also knows the prompt's length, the input's,
so edit functions can tell prompt positions from generated ones; outside it every position is the
prompt's (all of a plain forward's tokens were given).

`CleanPass` gives, for the same call, the hidden states of the unedited model (its own KV cache of
the unedited past, a forward stopped after the deepest layer asked for): what an SAE that must read
layers deeper than the one it edits (RouteSAE's routing) reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor

from routesae.errors import RouteSAEError
from routesae.model.hooks import StopForward, block_hidden
from routesae.model.loading import _base_model, decoder_layers


@dataclass
class ForwardCall:
    """One forward of the decoder, as the edit functions see it."""

    index: int
    """Forwards since the editor was entered, this one excluded (0: the first)."""
    positions: Tensor
    """[s] int64: absolute positions of the call's tokens in their sequence (for a left-padded batch,
    indices into the padded sequence)."""
    prompt_len: int | None
    """Length of the prompt being generated from; None outside `generate` (every position is the prompt's)."""
    args: tuple
    """The positional arguments the decoder (base model) was called with."""
    kwargs: dict[str, Any]
    """Its keyword arguments (input_ids, position_ids, the KV cache, ...)."""
    cache: Any | None
    """The model's KV cache object of this call; None for an uncached forward."""
    state: dict[str, Any] = field(default_factory=dict)
    """Scratch space for the edit functions of this call (a routing computed once per call, ...)."""

    @property
    def past(self) -> int:
        """Tokens the KV cache held before this call."""
        return int(self.positions[0]) if self.positions.numel() else 0

    @property
    def in_prompt(self) -> Tensor:
        """[s] bool: which of the call's positions belong to the prompt."""
        if self.prompt_len is None:
            return torch.ones_like(self.positions, dtype=torch.bool)
        return self.positions < self.prompt_len


EditFn = Callable[[Tensor, ForwardCall], "Tensor | None"]
"""(hidden [batch, s, d] in the model's dtype, the call) -> the replacement, or None to keep it."""
BeforeFn = Callable[[ForwardCall], None]
"""Runs once per forward, before the first block (e.g. a clean pass that routes the call's tokens)."""


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return isinstance(value, Cache)


def find_cache(args: tuple, kwargs: dict[str, Any]) -> Any | None:
    """The KV cache object among a forward's arguments (transformers 5 `cache`, older
    `past_key_values`; GPT-2's decoder takes it positionally), or None."""
    for value in (*args, *kwargs.values()):
        if _is_cache(value):
            return value
    return None


def _call_length(args: tuple, kwargs: dict[str, Any]) -> int:
    """Tokens in a forward's input (input_ids or inputs_embeds; [batch, s] / [batch, s, d])."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], Tensor):
        ids = args[0]
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        raise RouteSAEError("a forward without input_ids or inputs_embeds: cannot tell its positions")
    return int(ids.shape[1])


class ResidualEditor:
    """Forward hooks that replace hidden_states[layer] by `edits[layer](hidden, call)` on every
    forward while the editor is entered (a context manager). `before(call)` runs once per forward,
    before the first block. While entered, `model.generate` is wrapped (only) to record the
    prompt's length for the duration of the call; the wrapper is removed on exit."""

    def __init__(self, model: torch.nn.Module, edits: dict[int, EditFn], before: BeforeFn | None = None):
        self.model = model
        self.base = _base_model(model)
        self.blocks = decoder_layers(model)
        self.n_layers = len(self.blocks)
        for layer in edits:
            check_editable(layer, self.n_layers)
        self.edits = dict(edits)
        self.before = before
        self.prompt_len: int | None = None
        """The prompt's length; set by the wrapped `generate` for its duration, or by hand."""
        self.calls = 0
        """Forwards seen since entering."""
        self.num_beams = 1
        """Beams of the `generate` call under way (1 outside generate)."""
        self._call: ForwardCall | None = None
        self._paused = False
        self._handles: list[Any] = []
        self._saved_generate: Any = None

    # --- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "ResidualEditor":
        # Registered first, so it runs before an edit of layer 0 (a pre-hook of block 0).
        self._handles.append(self.base.register_forward_pre_hook(self._start, with_kwargs=True))
        self._handles.append(self.base.register_forward_hook(self._end, always_call=True))
        for layer, fn in sorted(self.edits.items()):
            if layer == 0:
                self._handles.append(self.blocks[0].register_forward_pre_hook(self._pre_edit(fn), with_kwargs=True))
            else:
                self._handles.append(self.blocks[layer - 1].register_forward_hook(self._post_edit(fn)))
        self._wrap_generate()
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._unwrap_generate()
        self._call = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hooks pass everything through (a clean pass run from inside a forward)."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    # --- hooks -----------------------------------------------------------------------------------
    def _start(self, module, args, kwargs):
        if self._paused:
            return None
        cache = find_cache(args, kwargs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        s = _call_length(args, kwargs)
        device = next(self.base.parameters()).device
        positions = torch.arange(past, past + s, device=device)
        self._call = ForwardCall(self.calls, positions, self.prompt_len, args, kwargs, cache)
        self.calls += 1
        if self.before is not None:
            self.before(self._call)
        return None

    def _end(self, module, args, output):
        if not self._paused:
            self._call = None  # a block run outside a decoder forward (the splice engine's) is not edited
        return None

    def _pre_edit(self, fn: EditFn):
        def hook(module, args, kwargs):
            if self._paused or self._call is None:
                return None
            if args:
                new = fn(args[0], self._call)
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"], self._call)
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return hook

    def _post_edit(self, fn: EditFn):
        def hook(module, args, output):
            if self._paused or self._call is None:
                return None
            new = fn(block_hidden(output), self._call)
            if new is None:
                return None
            return type(output)((new, *output[1:])) if isinstance(output, (tuple, list)) else new

        return hook

    # --- generate: the prompt's length ------------------------------------------------------------
    def _wrap_generate(self) -> None:
        generate = getattr(self.model, "generate", None)
        if generate is None:
            return
        self._saved_generate = self.model.__dict__.get("generate")

        def wrapped(*args, **kwargs):
            inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids", kwargs.get("inputs_embeds")))
            config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
            before = self.prompt_len, self.num_beams
            self.prompt_len = int(inputs.shape[1]) if isinstance(inputs, Tensor) else None
            self.num_beams = int(kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1)
            try:
                return generate(*args, **kwargs)
            finally:
                self.prompt_len, self.num_beams = before

        self.model.generate = wrapped

    def _unwrap_generate(self) -> None:
        if "generate" not in self.model.__dict__:
            return
        # put back exactly what was there (an instance attribute another tool set, or nothing)
        if self._saved_generate is None:
            del self.model.generate
        else:
            self.model.generate = self._saved_generate
        self._saved_generate = None


def check_editable(layer: int, n_layers: int) -> None:
    """hidden_states 0..n_layers-1 can be edited; n_layers is after the final norm (only the LM head follows)."""
    if layer == n_layers:
        raise RouteSAEError(
            f"layer {layer} is the last hidden state, after the final norm; only the LM head follows it, so "
            f"editing it is not a residual-stream edit (editable: 0..{n_layers - 1})"
        )
    if not 0 <= layer < n_layers:
        raise RouteSAEError(f"layer {layer} is outside this model's hidden states 0..{n_layers - 1}")


class CleanPass:
    """The unedited model's hidden states at `layers` for the tokens of each call of an editor.

    Runs the decoder again from inside the call's first hook, with the editor paused, on the same
    arguments, but with a KV cache of its own that holds the unedited past, and stops after the
    deepest layer asked for. Costs per forward: the blocks up to that layer once more, and a second
    KV cache for them. A call at past 0 starts a new sequence (and a new cache); any other call must
    continue the sequence the clean cache holds (beam search, which reorders caches, does not)."""

    def __init__(self, editor: ResidualEditor, layers: list[int]):
        for layer in layers:
            check_editable(layer, editor.n_layers)
        self.editor = editor
        self.layers = sorted(set(layers))
        self.deepest = self.layers[-1]
        self._cache: Any | None = None
        self._cached = 0  # tokens the clean cache holds (counted here: blocks past the deepest never fill it)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.editor.model.config)

    def states(self, call: ForwardCall) -> dict[int, Tensor]:
        """layer -> [batch, s, d] unedited hidden states of the call's tokens."""
        if self.editor.num_beams > 1:
            raise RouteSAEError("beam search reorders the KV cache between steps, which the clean pass's own cache "
                                "does not follow: generate with num_beams=1")
        args, kwargs = call.args, dict(call.kwargs)
        if call.cache is None:
            kwargs["use_cache"] = False
        else:
            if call.past == 0:
                self._cache, self._cached = self._new_cache(), 0
            if self._cache is None or self._cached != call.past:
                raise RouteSAEError(
                    f"the clean pass's cache holds {self._cached} tokens but the model's holds {call.past}: "
                    "the forwards are not one sequence continued step by step (beam search, or a cache reused "
                    "from before steering)"
                )
            swap = lambda v: self._cache if v is call.cache else v  # noqa: E731
            args = tuple(swap(a) for a in args)
            kwargs = {k: swap(v) for k, v in kwargs.items()}
        out: dict[int, Tensor] = {}
        handles = []

        def keep(layer: int):
            def post(module, a, output):
                out[layer] = block_hidden(output)
                if layer == self.deepest:
                    raise StopForward

            def pre(module, a, kw):
                out[0] = a[0] if a else kw["hidden_states"]
                if self.deepest == 0:
                    raise StopForward

            return pre if layer == 0 else post

        blocks = self.editor.blocks
        try:
            with self.editor.paused(), torch.no_grad():
                for layer in self.layers:
                    if layer == 0:
                        handles.append(blocks[0].register_forward_pre_hook(keep(0), with_kwargs=True))
                    else:
                        handles.append(blocks[layer - 1].register_forward_hook(keep(layer)))
                self.editor.base(*args, **kwargs)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if call.cache is not None:
            self._cached = call.past + int(call.positions.numel())
        return out
