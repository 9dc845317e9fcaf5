"""A forward pass that records chosen hidden states and stops after the deepest one.

Layers use Hugging Face `hidden_states` numbering: 0 is the input of the first block (the
embeddings, scaled or summed with positions as the model does), i is the output of block i-1,
and n_layers is the last block's output after the final norm, as `output_hidden_states` gives it.
No block past the deepest requested layer runs, and never the LM head.
"""

from __future__ import annotations

from typing import Any

import torch

from routesae.errors import RouteSAEError
from routesae.model.loading import decoder_layers, final_norm


class StopForward(Exception):
    """Raised by the last needed hook to end the forward pass early."""


def block_hidden(output: Any) -> torch.Tensor:
    """A decoder block's output hidden state: transformers 5 Llama blocks return a tensor, GPT-2 and
    older versions a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'middle' (L//4 .. 3L//4, the RouteSAE paper's routed layers), 'all', '4-12', '4,8,12'."""
    spec = spec.strip().lower()
    if spec == "middle":
        return list(range(n_layers // 4, 3 * n_layers // 4 + 1))
    if spec == "all":
        return list(range(n_layers + 1))
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                layers.update(range(int(lo), int(hi) + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise RouteSAEError(f"cannot read --layers {spec!r}: use 'middle', 'all', '4-12' or '4,8,12'") from None
    bad = sorted(i for i in layers if not 0 <= i <= n_layers)
    if bad or not layers:
        raise RouteSAEError(
            f"layer {bad[0] if bad else spec} out of range: this model has hidden_states 0..{n_layers} "
            f"(0 = embeddings, {n_layers} = last block after the final norm)"
        )
    return sorted(layers)


class HiddenStateCapture:
    """Hooks that copy the requested hidden states out of a forward pass and stop it early."""

    def __init__(self, model: torch.nn.Module, layers: list[int]):
        self.model = model
        self.layers = sorted(layers)
        blocks = decoder_layers(model)
        self.n_layers = len(blocks)
        if not self.layers or self.layers[0] < 0 or self.layers[-1] > self.n_layers:
            raise RouteSAEError(f"layers {layers} out of range 0..{self.n_layers}")
        self._out: dict[int, torch.Tensor] = {}
        self._dest: torch.Tensor | None = None
        self._handles = []
        deepest = self.layers[-1]
        for layer in self.layers:
            stop = layer == deepest
            if layer == 0:
                self._handles.append(blocks[0].register_forward_pre_hook(self._pre_hook(stop), with_kwargs=True))
            elif layer < self.n_layers:
                self._handles.append(blocks[layer - 1].register_forward_hook(self._post_hook(layer, stop)))
            else:
                self._handles.append(final_norm(model).register_forward_hook(self._post_hook(layer, stop)))

    def _pre_hook(self, stop: bool):
        def hook(module, args, kwargs):
            self._keep(0, args[0] if args else kwargs["hidden_states"])
            if stop:
                raise StopForward

        return hook

    def _post_hook(self, layer: int, stop: bool):
        def hook(module, args, output):
            self._keep(layer, block_hidden(output))
            if stop:
                raise StopForward

        return hook

    def _keep(self, layer: int, hidden: torch.Tensor) -> None:
        if self._dest is None:
            self._out[layer] = hidden
        else:  # straight into the caller's buffer (on a GPU, harvest's device buffer: host_staging.py): one copy
            self._dest[self.layers.index(layer)].copy_(hidden)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [batch, seq] → hidden states [n_requested_layers, batch, seq, d_model].

        With `out` (that shape, any device and dtype) the states are copied into it and it is returned."""
        self._out.clear()
        self._dest = out
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass
        finally:
            self._dest = None
        if out is not None:
            return out
        result = torch.stack([self._out[layer] for layer in self.layers])
        self._out.clear()
        return result

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "HiddenStateCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
