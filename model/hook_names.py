"""Which residual stream an SAE reads, in each toolkit's naming, and back to routesae's.

routesae numbers layers as Hugging Face `hidden_states`: 0 is the input of block 0 (the
embeddings as the model scales or sums them), i is the output of block i-1, and n_layers is the
last block's output after the final norm. The other toolkits name the output of block N:
TransformerLens / SAELens `blocks.N.hook_resid_post`, a transformers module path
`model.layers.N`, sparsify's hookpoint `layers.N`, Goodfire's file names `lN`, Gemma Scope's
folders `layer_N`: all of them hidden_states[N + 1]. `blocks.N.hook_resid_pre` is hidden_states[N].

One trap: the last block's `hook_resid_post` is *before* the final norm, while hidden_states[n_layers]
is after it, so for that index there is no TransformerLens residual hook and the two are refused as
the same thing wherever the layer count is known.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from routesae.errors import RouteSAEError

# Where a transformers causal LM keeps its decoder blocks and final norm, by class name; the rest
# (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo 2) use model.layers and model.norm. Sparsify names
# hookpoints from the base model down (no prefix).
_HF_BLOCKS = {"GPT2LMHeadModel": "transformer.h", "GPTNeoXForCausalLM": "gpt_neox.layers"}
_HF_NORMS = {"GPT2LMHeadModel": "transformer.ln_f", "GPTNeoXForCausalLM": "gpt_neox.final_layer_norm"}
_SPARSIFY_BLOCKS = {"GPT2LMHeadModel": "h", "GPTNeoXForCausalLM": "layers"}


class HookNames(NamedTuple):
    """One residual stream, named the ways other tools name it."""

    hidden_states: int
    """routesae's (Hugging Face's) index."""
    transformer_lens: str | None
    """TransformerLens / SAELens hook: blocks.N.hook_resid_post (blocks.0.hook_resid_pre for index 0);
    None after the final norm (index n_layers), which no TransformerLens hook names."""
    hf_module: str
    """The transformers module whose output (or, for index 0, input) it is: model.layers.N, model.norm."""
    hf_point: str
    """'output' or 'input' of hf_module."""
    sparsify: str | None
    """sparsify's hookpoint (layers.N); None where it has none (index 0, after the final norm)."""

    def to_dict(self) -> dict:
        return self._asdict()


def hook_names(layer: int, n_layers: int | None = None, architecture: str | None = None) -> HookNames:
    """The names of hidden_states[layer]; n_layers (when known) tells the post-final-norm index apart."""
    if layer < 0:
        raise RouteSAEError(f"layer {layer} is not a hidden_states index (0 = embeddings)")
    blocks = _HF_BLOCKS.get(architecture or "", "model.layers")
    sparsify_blocks = _SPARSIFY_BLOCKS.get(architecture or "", "layers")
    if layer == 0:
        return HookNames(0, "blocks.0.hook_resid_pre", f"{blocks}.0", "input", None)
    if n_layers is not None and layer == n_layers:
        return HookNames(layer, None, _HF_NORMS.get(architecture or "", "model.norm"), "output", None)
    if n_layers is not None and layer > n_layers:
        raise RouteSAEError(f"layer {layer} is past the model's hidden_states 0..{n_layers}")
    n = layer - 1
    return HookNames(layer, f"blocks.{n}.hook_resid_post", f"{blocks}.{n}", "output", f"{sparsify_blocks}.{n}")


_TL = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_HF = re.compile(r"^(?:model\.layers|transformer\.h|gpt_neox\.layers|model\.language_model\.layers)\.(\d+)$")
_SPARSIFY = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)$")
_GOODFIRE = re.compile(r"(?:^|[^a-z0-9])l(\d+)(?![0-9])", re.IGNORECASE)
_GEMMASCOPE = re.compile(r"^layer_(\d+)$")


def from_transformer_lens(name: str) -> int:
    """`blocks.N.hook_resid_post` -> N + 1, `blocks.N.hook_resid_pre` -> N; anything else is refused."""
    m = _TL.match(name)
    if not m:
        raise RouteSAEError(
            f"hook {name!r} is not a residual stream (blocks.N.hook_resid_post / hook_resid_pre): "
            "routesae SAEs read hidden_states only"
        )
    n = int(m.group(1))
    return n + 1 if m.group(2) == "post" else n


def from_hf_module(name: str) -> int:
    """A block's module path (`model.layers.N`, output) -> N + 1."""
    m = _HF.match(name)
    if not m:
        raise RouteSAEError(f"module {name!r} is not a decoder block's output (model.layers.N)")
    return int(m.group(1)) + 1


def from_sparsify(hookpoint: str) -> int:
    """sparsify's `layers.N` (a block's output) -> N + 1; sub-module hookpoints are refused."""
    m = _SPARSIFY.match(hookpoint)
    if not m:
        raise RouteSAEError(
            f"sparsify hookpoint {hookpoint!r} is not a block's output (layers.N): routesae SAEs read the residual stream only"
        )
    return int(m.group(1)) + 1


def from_goodfire_filename(stem: str) -> int | None:
    """Goodfire's `...-l19` in a file name (the output of model.layers[19]) -> 20; None if absent."""
    found = {int(m.group(1)) for m in _GOODFIRE.finditer(stem)}
    if len(found) > 1:
        raise RouteSAEError(f"file name {stem!r} names several layers ({sorted(found)}): pass --layer")
    return found.pop() + 1 if found else None


def from_gemmascope_folder(part: str) -> int | None:
    """Gemma Scope's `layer_N` folder (blocks.N.hook_resid_post in its residual releases) -> N + 1."""
    m = _GEMMASCOPE.match(part)
    return int(m.group(1)) + 1 if m else None


def check_layer(found: int | None, given: int | None, what: str) -> int:
    """The hidden_states index to use: the file's own (`found`, described by `what`), which --layer
    (`given`) may repeat but not contradict; --layer alone where the file names none."""
    if found is None and given is None:
        raise RouteSAEError("the file does not say which layer it reads: pass --layer (a hidden_states index)")
    if found is not None and given is not None and found != given:
        raise RouteSAEError(
            f"--layer {given} contradicts {what}, which is hidden_states[{found}] "
            f"(--layer is a hidden_states index: the output of block N is {found} = N + 1)"
        )
    return found if found is not None else int(given)  # type: ignore[arg-type]
