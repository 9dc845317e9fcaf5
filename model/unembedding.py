"""A model's output embedding W_U [vocab, d], read without loading the rest of the model: from a
.gguf file its one tensor, dequantized as transformers' GGUF loader does; from a transformers
folder the one safetensors tensor its head uses. The dashboard's logit-lens table needs nothing
else, and reading the whole offline model for it took ~18 s of a 20 s dashboard. A hub id, or a
folder without safetensors, falls back to the full load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from routesae.errors import RouteSAEError
from routesae.model.loading import (
    check_revision,
    check_shape,
    load_store_model,
    locate_model,
    quiet_loading,
    resolve_dtype,
    store_model_spec,
)


TIED_IN_TRANSFORMERS = ("falcon", "bloom")
"""GGUF architectures whose head transformers' loader ties to the token embedding even where the
file holds an output.weight."""


def _gguf_head(path: Path) -> torch.Tensor | None:
    """The head of a GGUF model: its `output.weight`, or where it has none (a tied head, as
    transformers reads it) its token embedding."""
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    # transformers ties these two architectures' heads to the token embedding whatever the file holds
    t = None if architecture in TIED_IN_TRANSFORMERS else tensors.get("output.weight")
    t = t if t is not None else tensors.get("token_embd.weight")
    if t is None:
        return None
    return torch.from_numpy(dequantize(t.data, t.tensor_type).copy())


def _head_names(folder: Path) -> list[str]:
    """State-dict names under which the model's head weight lives (several when tied), from a
    skeleton built on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_loading():
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    head = skeleton.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        return []
    return [n for n, p in skeleton.named_parameters(remove_duplicate=False) if p is head.weight]


def _safetensors_head(folder: Path) -> torch.Tensor | None:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        weight_map = {}
        for f in files:
            with safe_open(f, "pt") as fh:
                weight_map.update({key: f.name for key in fh.keys()})
    for name in _head_names(folder):  # a tied head is saved once, under either name
        if name in weight_map:
            with safe_open(folder / weight_map[name], "pt") as fh:
                return fh.get_tensor(name)
    return None


def load_store_unembedding(store: Path, recorded: dict[str, Any], spec: str | None, purpose: str) -> torch.Tensor:
    """W_U [vocab, d] on the CPU, in the recorded dtype, of the model a store was harvested from
    (`recorded`: its model provenance), from `spec` if given else its recorded id. Refuses a model
    of another revision or width as `load_store_model` does."""
    spec = store_model_spec(store, recorded, spec)
    target, kwargs, source, revision = locate_model(spec)
    if source in ("gguf", "local"):  # the revision is the files' fingerprint: refuse before reading
        check_revision(spec, revision, recorded, store, purpose)
    weight = None
    if source == "gguf":
        weight = _gguf_head(Path(target) / kwargs["gguf_file"])
    elif source == "local":
        weight = _safetensors_head(Path(target))
    if weight is None:  # a hub model, .bin weights or an unusual layout: the whole model, once
        loaded = load_store_model(store, recorded, spec, "cpu", purpose)
        head = loaded.model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise RouteSAEError(f"the model {spec!r} has no output embedding to {purpose}")
        return head.weight.detach()
    check_shape(spec, {"d_model": weight.shape[1]}, recorded)
    return weight.to(resolve_dtype(recorded.get("compute_dtype") or recorded.get("dtype", "bfloat16"))[1])
