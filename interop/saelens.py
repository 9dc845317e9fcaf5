"""SAELens SAE folders: `cfg.json` + `sae_weights.safetensors`, configs of SAELens 6 (nested
`metadata`) and before (flat: hook_point / hook_name, activation_fn_str, activation_fn_kwargs.k).

Tensors (W_enc [d_in, d_sae], W_dec [d_sae, d_in]): standard and topk W_enc, b_enc, W_dec, b_dec;
jumprelu adds threshold; gated W_enc, b_gate, b_mag, r_mag, W_dec, b_dec. SAELens's encoder reads
x' = x - b_dec when `apply_b_dec_to_input` (the default, also for configs that predate the key),
else x (folded into the encoder biases here). Inference architectures standard (ReLU), topk (top k,
then ReLU; `rescale_acts_by_decoder_norm` folded into the weights), jumprelu (ReLU(pre) * 1[pre >
threshold]) and gated; the others (transcoders, abstopk, temporal, matching pursuit) are refused.

Input normalization (`normalize_activations`): 'none' imports as 'none'. 'expected_average_only_in'
is applied outside the SAE (SAELens's ActivationScaler multiplies x by a dataset factor and divides
x_hat by it; the SAE itself does nothing), so the factor comes from the folder's
activation_scaler.json or from --scale, and becomes routesae's 'dataset' scale; without either it is
refused. 'layer_norm' ((x - mean) / (unbiased std + 1e-5), x_hat * unbiased std + mean) differs from
routesae's 'token' normalization (population std + 1e-6) by a token-dependent factor no weight can
absorb exactly, so it is refused, as are 'constant_norm_rescale' and 'covariance_whitening'; except
in a folder routesae exported itself, whose metadata.routesae says the SAE is routesae's 'token' SAE
with sqrt(d/(d-1)) folded into its weights: that factor is divided back out and the SAE imports as
the 'token' SAE it was.

The hook `blocks.N.hook_resid_post` is hidden_states[N + 1] (`blocks.N.hook_resid_pre` is N); other
hooks (MLP, attention, hook_z) are refused. A routesae export of hidden_states[n_layers] (after the
final norm, which no hook names) carries its index in metadata.routesae.hidden_states."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from routesae.errors import RouteSAEError
from routesae.model.hook_names import from_hf_module, from_transformer_lens
from routesae.interop.portable import PortableSAE
from routesae.interop.source import Source
from routesae.interop.weights import dtype_name, oriented, read_safetensors, require, vector

CFG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
TENSORS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"),
}
KIND = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
_REFUSED_NORMS = {
    "layer_norm": "per-token (x - mean) / (unbiased std + 1e-5), where routesae's 'token' normalization divides by "
                  "the population std + 1e-6: the two differ by a token-dependent factor no weight absorbs exactly",
    "constant_norm_rescale": "per-token x * sqrt(d_in) / ||x||, which no routesae normalization expresses",
    "covariance_whitening": "a whitening whose matrices cfg.json does not hold",
}


def read(path: Path, scale: float | None = None) -> Source:
    folder = path.parent if path.is_file() and path.name in (CFG, WEIGHTS) else path
    if not folder.is_dir() or not (folder / CFG).is_file() or not (folder / WEIGHTS).is_file():
        raise RouteSAEError(f"{path} is not a SAELens SAE folder: it needs {CFG} and {WEIGHTS}")
    try:
        raw = json.loads((folder / CFG).read_text())
    except ValueError as e:
        raise RouteSAEError(f"{folder / CFG} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise RouteSAEError(f"{folder / CFG} is not a SAELens config")
    cfg, meta, version = _config(raw)
    arch = cfg["architecture"]
    if arch not in TENSORS:
        raise RouteSAEError(f"{folder}: SAELens architecture {arch!r} is not supported (standard, topk, jumprelu, gated)")
    if cfg.get("reshape_activations", "none") != "none" or meta.get("hook_head_index") is not None:
        raise RouteSAEError(f"{folder}: an SAE on attention heads (hook_z) is not a residual-stream SAE")
    if cfg.get("finetuning_scaling_factor"):
        raise RouteSAEError(f"{folder}: finetuning_scaling_factor (a per-latent decoder scale) is not supported")

    where = folder / WEIGHTS
    tensors = read_safetensors(where)
    require(tensors, TENSORS[arch], where, f"SAELens {arch} SAE")
    if "scaling_factor" in tensors and not torch.allclose(tensors["scaling_factor"].float(), torch.ones(())):
        raise RouteSAEError(f"{where}: a scaling_factor that is not all ones (finetuning scaling) is not supported")
    d_in, d_sae = int(tensors["b_dec"].shape[-1]), int(tensors["b_gate" if arch == "gated" else "b_enc"].shape[-1])
    for key, want in (("d_in", d_in), ("d_sae", d_sae)):
        if cfg.get(key) is not None and int(cfg[key]) != want:
            raise RouteSAEError(f"{folder}: cfg.json says {key} {cfg[key]}, the weights have {want}: inconsistent shapes")
    v = {name: tensors[name] for name in TENSORS[arch]}
    W_enc = oriented(v["W_enc"], d_in, d_sae, "W_enc", where)
    W_dec = oriented(v["W_dec"], d_sae, d_in, "W_dec", where)
    vec = {name: vector(t, d_sae, name, where) for name, t in v.items() if name not in ("W_enc", "W_dec", "b_dec")}
    b_dec = vector(v["b_dec"], d_in, "b_dec", where)
    subtracts = bool(cfg.get("apply_b_dec_to_input", True))
    conventions = [
        f"SAELens {arch} (config of SAELens {version or 'before 6'}): "
        + ("x' = x - b_dec (apply_b_dec_to_input)" if subtracts else "x' = x (apply_b_dec_to_input false: b_dec folded into the encoder biases)")
    ]
    k = None
    if arch == "topk":
        k = cfg.get("k")
        if not isinstance(k, int) or not 0 < k <= d_sae:
            raise RouteSAEError(f"{folder}: a topk SAE needs k between 1 and {d_sae} in cfg.json, found {k!r}")
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms = W_dec.double().norm(dim=1)
            W_enc = (W_enc.double() * norms).float()
            vec["b_enc"] = (vec["b_enc"].double() * norms).float()
            W_dec = (W_dec.double() / norms[:, None]).float()
            conventions.append("rescale_acts_by_decoder_norm folded in: W_enc and b_enc times ||W_dec,i||, W_dec rows to unit norm")
    sae = PortableSAE(KIND[arch], W_enc, W_dec, b_dec, subtracts, b_enc=vec.get("b_enc"), threshold=vec.get("threshold"),
                      b_gate=vec.get("b_gate"), b_mag=vec.get("b_mag"), r_mag=vec.get("r_mag"), k=k)

    norm = cfg.get("normalize_activations") or "none"
    exported = meta.get("routesae") if isinstance(meta.get("routesae"), dict) else {}
    normalization = "none"
    if norm == "layer_norm" and _routesae_token(exported):
        if scale is not None:
            raise RouteSAEError(f"{folder}: --scale does not apply to an SAE that normalizes each token (routesae 'token')")
        sae, normalization = _unfold_layer_norm(folder, sae, exported, conventions), "token"
    else:
        scale = _input_scale(folder, norm, scale, conventions)
    hook = meta.get("hook_name")
    layer = None
    if not hook and isinstance(exported.get("hidden_states"), int):
        # routesae's export of hidden_states[n_layers]: after the final norm, named by no hook
        layer = exported["hidden_states"]
        conventions.append(f"no hook_name: hidden_states[{layer}] from metadata.routesae (a routesae export)")
    elif hook:
        layer = from_transformer_lens(str(hook))
        conventions.append(f"hook '{hook}' = hidden_states[{layer}]")
        if meta.get("hf_hook_name") and from_hf_module(str(meta["hf_hook_name"])) != layer:
            raise RouteSAEError(f"{folder}: hook_name {hook!r} and hf_hook_name {meta['hf_hook_name']!r} name different layers")
    elif meta.get("hf_hook_name"):
        hook = str(meta["hf_hook_name"])
        layer = from_hf_module(hook)
        conventions.append(f"hf_hook_name '{hook}' (output) = hidden_states[{layer}]")
    details = {key: meta.get(key) for key in ("context_size", "prepend_bos", "dataset_path", "exclude_special_tokens",
                                              "model_name", "neuronpedia_id") if meta.get(key) is not None}
    return Source(
        "saelens", sae, [folder / CFG, where], dtype_name(v), layer=layer, hook=str(hook) if hook else None, scale=scale,
        normalization=normalization, model=meta.get("model_name"), details={**details, "saelens_cfg": raw},
        conventions=conventions,
    )


def _routesae_token(exported: dict[str, Any]) -> bool:
    """Whether metadata.routesae says the SAE is routesae's 'token' SAE exported as layer_norm: the
    input_normalization of exports since it is written, the record's scheme in earlier ones."""
    if "input_normalization" in exported:
        return exported["input_normalization"] == "token"
    record = exported.get("reuse") if isinstance(exported.get("reuse"), dict) else {}
    norm = record.get("normalization") if isinstance(record.get("normalization"), dict) else {}
    return norm.get("scheme") == "token"


def _unfold_layer_norm(folder: Path, sae: PortableSAE, exported: dict[str, Any], conventions: list[str]) -> PortableSAE:
    """routesae's 'token' SAE back from its layer_norm export: the export multiplied W_enc by
    a = sqrt(d/(d-1)) (and divided W_dec, b_dec by it) so that SAELens's unbiased std reads as the
    population std; dividing a back out gives the SAE on routesae's (x - mean) / (population std + eps)."""
    a = math.sqrt(sae.d_in / (sae.d_in - 1))
    recorded = exported.get("layer_norm_factor", a)  # exports before the key always folded sqrt(d/(d-1))
    if not isinstance(recorded, (int, float)) or not math.isclose(recorded, a, rel_tol=1e-6):
        raise RouteSAEError(f"{folder}: metadata.routesae.layer_norm_factor {recorded!r} is not sqrt(d/(d-1)) = {a:.8f} "
                            f"for d_in {sae.d_in}: not a folder routesae exported")
    conventions.append(f"layer_norm of a routesae 'token' SAE (metadata.routesae): sqrt(d/(d-1)) = {a:.8f} divided back out "
                       "of the weights; imported as routesae 'token' normalization, (x - mean) / (population std + 1e-6)")
    return sae.scaled_input(1 / a)


def _config(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """-> (config, its metadata, SAELens version), a pre-6 flat config read the way SAELens 6 reads it."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    version = raw.get("sae_lens_version") or meta.get("sae_lens_version")
    if version and _at_least_6(str(version)):
        cfg = dict(raw)
        cfg.setdefault("architecture", "standard")
        return cfg, dict(meta), str(version)
    # Before SAELens 6: one flat dict; renamed keys and defaults as SAELens's handle_pre_6_0_config.
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    cfg = {renames.get(k, k): v for k, v in raw.items()}
    cfg.setdefault("architecture", "standard")
    act = cfg.get("activation_fn") or "relu"
    if act == "topk":
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise RouteSAEError("SAELens config: activation_fn 'topk' without activation_fn_kwargs.k")
        cfg["architecture"], cfg["k"] = "topk", k
    elif act != "relu":
        raise RouteSAEError(f"SAELens config: activation_fn {act!r} is not supported (relu, topk)")
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool):
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    return cfg, {**meta, **cfg}, str(version) if version else None


def _at_least_6(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) >= Version("6.0.0rc0")
    except InvalidVersion:
        raise RouteSAEError(f"SAELens config: unreadable sae_lens_version {version!r}") from None


def _input_scale(folder: Path, norm: str, scale: float | None, conventions: list[str]) -> float | None:
    if norm in _REFUSED_NORMS:
        raise RouteSAEError(f"{folder}: normalize_activations {norm!r} ({_REFUSED_NORMS[norm]}) cannot be imported")
    if norm == "none":
        if scale is not None:
            conventions.append(f"--scale {scale}: inputs multiplied by it before encoding, x_hat divided by it")
        return scale
    if norm != "expected_average_only_in":
        raise RouteSAEError(f"{folder}: unknown normalize_activations {norm!r}")
    if scale is None and (folder / SCALER).is_file():
        try:
            scale = json.loads((folder / SCALER).read_text()).get("scaling_factor")
        except (ValueError, AttributeError):
            raise RouteSAEError(f"{folder / SCALER} is not a SAELens activation scaler") from None
        if scale is not None:
            conventions.append(f"expected_average_only_in: scaling factor {scale} from {SCALER}")
    elif scale is not None:
        conventions.append(f"expected_average_only_in: scaling factor {scale} from --scale")
    if scale is None:
        raise RouteSAEError(
            f"{folder}: normalize_activations 'expected_average_only_in' scales inputs by a dataset factor that "
            f"cfg.json does not hold: pass --scale FACTOR (SAELens's norm_scaling_factor; 1 if already folded in)"
        )
    return float(scale)
