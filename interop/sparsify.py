"""EleutherAI sparsify's SAEs: one folder per hookpoint (`layers.N`), holding `cfg.json` and
`sae.safetensors` with `encoder.weight` [num_latents, d_in], `encoder.bias`, `W_dec` [num_latents, d_in]
and `b_dec`.

encode = top-k of ReLU((x - b_dec) W_e^T + b_e), decode = f W_dec + b_dec: b_dec subtracted first,
no input normalization (routesae's topk with normalization 'none', the same function: the top k
of the ReLU'd pre-activations are the ReLU'd top k). The hookpoint `layers.N` is the output of
block N, hidden_states[N + 1]. W_dec's orientation is taken from its shape (SAELens's sparsify loader
and sparsify's own code disagree on it). Transcoders, skip connections and groupmax are refused.

A folder routesae exported has routesae.json beside cfg.json (earlier exports: a "routesae" key in
cfg.json): its hidden_states index names the layer where the folder's name does not, and its
input_normalization 'token' says the SAE reads routesae's per-token normalized inputs, so it
imports back as the 'token' SAE it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from routesae.errors import RouteSAEError
from routesae.model.hook_names import from_sparsify
from routesae.interop.portable import PortableSAE
from routesae.interop.source import Source
from routesae.interop.weights import dtype_name, oriented, read_safetensors, require, vector

NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
SIDE_FILE = "routesae.json"
"""What routesae's export writes beside cfg.json (export.SIDE_FILE)."""
HOOKPOINT_PREFIXES = ("layers.", "h.", "model.", "transformer.", "gpt_neox.", "embed")
"""Folder names read as a hookpoint (module paths below the base model); any other name says nothing."""


def read(path: Path) -> Source:
    if path.is_file() and path.name in ("cfg.json", "sae.safetensors"):
        path = path.parent
    if not path.is_dir():
        raise RouteSAEError(f"{path} is not a sparsify SAE folder (cfg.json + sae.safetensors)")
    if not (path / "cfg.json").is_file() or not (path / "sae.safetensors").is_file():
        inner = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "cfg.json").is_file())
        if inner:
            raise RouteSAEError(f"{path} holds several hookpoints ({', '.join(inner[:6])}): pass the folder of one")
        raise RouteSAEError(f"{path} is not a sparsify SAE folder: it needs cfg.json and sae.safetensors")
    try:
        cfg = json.loads((path / "cfg.json").read_text())
    except ValueError as e:
        raise RouteSAEError(f"{path / 'cfg.json'} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise RouteSAEError(f"{path / 'cfg.json'} is not a sparsify config")
    for key, bad in (("transcode", True), ("skip_connection", True)):
        if cfg.get(key) == bad:
            raise RouteSAEError(f"{path}: a sparsify {key.replace('_', ' ')} SAE is not an autoencoder of one stream: not supported")
    if cfg.get("activation", "topk") != "topk":
        raise RouteSAEError(f"{path}: sparsify activation {cfg.get('activation')!r} is not supported (topk only)")
    tensors = read_safetensors(path / "sae.safetensors")
    if "W_skip" in tensors:
        raise RouteSAEError(f"{path}: a sparsify SAE with a skip connection (W_skip) is not supported")
    require(tensors, NAMES, path / "sae.safetensors", "sparsify SAE")
    b_enc, b_dec = tensors["encoder.bias"], tensors["b_dec"]
    d_sae, d_in = int(b_enc.shape[-1]), int(b_dec.shape[-1])
    where = path / "sae.safetensors"
    for key, want in (("d_in", d_in), ("num_latents", d_sae)):
        if cfg.get(key) not in (None, 0, want):
            raise RouteSAEError(f"{path}: cfg.json says {key} {cfg[key]}, the weights have {want}: inconsistent shapes")
    k = cfg.get("k")
    if not isinstance(k, int) or not 0 < k <= d_sae:
        raise RouteSAEError(f"{path}: cfg.json's k {k!r} is not between 1 and {d_sae}")
    sae = PortableSAE(
        "topk", oriented(tensors["encoder.weight"], d_in, d_sae, "encoder.weight", where),
        oriented(tensors["W_dec"], d_sae, d_in, "W_dec", where), vector(b_dec, d_in, "b_dec", where),
        subtracts_b_dec=True, b_enc=vector(b_enc, d_sae, "encoder.bias", where), k=k,
    )
    conventions = [f"sparsify: top-{k} of ReLU((x - b_dec) W_e^T + b_e), x_hat = f W_dec + b_dec; b_dec subtracted first, "
                   "no input normalization"]
    layer = hook = None
    if path.resolve().name.startswith(HOOKPOINT_PREFIXES):  # sparsify names the folder after the hookpoint
        hook = path.resolve().name
        layer = from_sparsify(hook)
        conventions.append(f"hookpoint '{hook}' = output of block {layer - 1} = hidden_states[{layer}]")
    files = [path / "cfg.json", where]
    exported = _exported(path, cfg, files)
    normalization = "none"
    if exported.get("input_normalization") == "token":
        normalization = "token"
        conventions.append("routesae export of a 'token' SAE: it reads (x - mean) / (population std + 1e-6), "
                           "imported as routesae 'token' normalization")
    if isinstance(exported.get("hidden_states"), int):
        if layer is not None and layer != exported["hidden_states"]:
            raise RouteSAEError(f"{path}: the folder's name says hidden_states[{layer}], its {SIDE_FILE} "
                                f"hidden_states[{exported['hidden_states']}]: inconsistent")
        if layer is None:
            layer = exported["hidden_states"]
            conventions.append(f"hidden_states[{layer}] from {SIDE_FILE} (a routesae export)")
    record = exported.get("reuse") if isinstance(exported.get("reuse"), dict) else {}
    details = {key: record.get(name) for key, name in (("context_size", "context_len"), ("prepend_bos", "prepend_bos"),
               ("dataset_path", "dataset"), ("exclude_special_tokens", "special_tokens_excluded")) if record.get(name) is not None}
    return Source(
        "sparsify", sae, files, dtype_name({n: tensors[n] for n in NAMES}),
        layer=layer, hook=hook, normalization=normalization, model=record.get("model_hub_id"),
        details={**details, "sparsify_cfg": cfg}, conventions=conventions,
    )


def _exported(path: Path, cfg: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """routesae's own fields of a folder it exported ({} for any other sparsify folder); the side file is added to `files`."""
    side = path / SIDE_FILE
    if side.is_file():
        try:
            block = json.loads(side.read_text())
        except ValueError as e:
            raise RouteSAEError(f"{side} is not valid JSON ({e})") from None
        if not isinstance(block, dict):
            raise RouteSAEError(f"{side} is not routesae's export record")
        files.append(side)
        return block
    return cfg["routesae"] if isinstance(cfg.get("routesae"), dict) else {}
