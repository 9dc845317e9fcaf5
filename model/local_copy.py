"""Save a model as a plain transformers folder (safetensors + config + tokenizer): what a server such
as `transformers serve FOLDER` loads. The offline SmolLM2 ships as GGUF, and transformers refuses to
`save_pretrained` a GGUF-loaded model (it counts as quantized), so the copy is a model of the same
architecture, built from the config without its quantization entry, holding the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

from routesae.atomic_files import atomic_directory
from routesae.errors import RouteSAEError

MARKER = "routesae-local-copy.json"
"""Written last into a finished copy: what it was made from. A folder without it is unfinished."""


def save_local_copy(spec: str, out: Path, dtype: str = "float32") -> Path:
    """Write `spec` ('smollm2', a .gguf file, a local folder) as a transformers folder at `out` and
    return it. A finished copy of the same model and dtype already there is kept as it is.

    dtype: of the saved weights; float32 by default, the quick one for CPU inference."""
    from routesae.model.loading import locate_model, load_model
    from transformers import AutoModelForCausalLM

    out = Path(out)
    target, kwargs, source, revision = locate_model(spec)
    origin = {"spec": spec, "source": source, "revision": revision, "dtype": dtype,
              "from": str(Path(target) / kwargs["gguf_file"]) if "gguf_file" in kwargs else target}
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == origin:
                return out
        except ValueError:
            pass
        raise RouteSAEError(f"{out} holds a copy of another model or dtype; choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RouteSAEError(f"{out} exists and is not an empty folder; choose another --out")
    loaded = load_model(spec, dtype, "cpu")
    config = loaded.model.config
    # The GGUF loader records itself as a quantization config; without it the same config builds a
    # plain (serializable) model, and the dequantized weights load into it unchanged.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.model.dtype)
    missing, unexpected = model.load_state_dict(loaded.model.state_dict(), strict=False)
    # Tied output embeddings are absent from a GGUF state dict by design; anything else is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RouteSAEError(f"the copy of {spec!r} does not match its weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(loaded.model, "generation_config", None) is not None:
        model.generation_config = loaded.model.generation_config
    model.eval()
    # Save into a sibling folder and rename at the end, so `out` is either absent or finished.
    with atomic_directory(out) as tmp:  # `out` is absent or empty (checked above)
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(origin, indent=1))
    return out
