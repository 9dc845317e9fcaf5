"""`routesae export`: a routesae SAE folder -> a folder SAELens's `SAE.load_from_disk` or sparsify's
`SparseCoder.load_from_disk` reads, encoding and reconstructing as load_sae does.

What each config cannot express, and what is done about it (also written into the exported config):
- routesae subtracts b_dec before the encoder: SAELens's apply_b_dec_to_input true, sparsify always.
- 'dataset' normalization (x * scale): folded into the weights (W_enc * s, W_dec / s, b_dec / s), so
  both read raw activations; normalize_activations 'none'.
- 'token' normalization, (x - mean) / (population std + 1e-6): SAELens's 'layer_norm' divides by the
  unbiased std + 1e-5, so a factor a = sqrt(d / (d - 1)) is folded into the weights (W_enc * a,
  W_dec / a, b_dec / a); the epsilons still differ, leaving a relative difference of about
  1e-5 / std(x) in the code and 1e-6 / std(x) in the reconstruction, except where a threshold
  decision (a gate, a JumpReLU threshold, the k-th largest) lies that close to its boundary: there
  one latent switches on or off (docs/formats-interop.md gives the measured rate). sparsify has no
  input normalization: the exported SAE reads normalized inputs, and its side file says so.
- What sparsify does not read (where the SAE came from, its layer, its normalization, the record)
  goes to routesae.json beside cfg.json, so sparsify loads cfg.json without dropping anything;
  SAELens keeps it under metadata.routesae. `routesae import` reads both back, so an export imports
  back to the same SAE, 'token' normalization included.
- BatchTopK and Matryoshka are JumpReLUs with one threshold at inference: SAELens jumprelu; sparsify
  (top-k only) cannot hold them, nor vanilla, gated or jumprelu SAEs: refused.
- RouteSAE: the router has no place in either format: its shared SAE is exported for one routed
  layer (--layer), encoding that layer as if routed to it with weight 1; MLSAE likewise. Crosscoders
  (one code over several layers) are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routesae import __version__
from routesae.errors import RouteSAEError
from routesae.interop.choices import EXPORT_FORMATS as FORMATS
from routesae.model.hook_names import HookNames, hook_names
from routesae.interop.portable import PortableSAE, from_routesae_tensors
from routesae.sae_record import hub_id, sae_record
from routesae.atomic_files import write_json
from routesae.train.checkpoint import write_safetensors
from routesae.train.load import load_sae
from routesae.train.normalize import EPS

SAELENS_CONFIG_VERSION = "6.0.0"
"""The cfg.json layout written is SAELens 6's (nested metadata); the version tells its loader so
(without one it reads the file as a pre-6 flat config)."""
SAELENS_LAYER_NORM_EPS = 1e-5
SIDE_FILE = "routesae.json"
"""Beside a sparsify export's cfg.json: routesae's own fields, which sparsify's config does not hold."""
FLIP_NOTE = ("a threshold decision (gate, JumpReLU threshold, k-th largest) that close to its boundary can go "
             "the other way, switching that one latent on or off (measured: about 1e-6 of entries at std(x) = 1)")
KIND_OF_CODER = {"topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu", "relu": "relu",
                 "gated": "gated", "jumprelu": "jumprelu"}
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
SAELENS_TENSORS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"),
    "gated": ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"),
}


@dataclass
class ExportResult:
    """What `export_sae` wrote, and what the reader of it must know."""

    out: Path
    layer: int
    notes: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    sae: PortableSAE
    """The coder as equations, in routesae's normalized space."""
    layer: int
    normalization: str
    scale: float | None
    record: dict[str, Any]
    """The folder's "reuse" block (sae_record.py), rebuilt from its config for folders written before it."""
    model: dict[str, Any]
    notes: list[str]


def export_sae(run: str | Path, fmt: str, out: str | Path, layer: int | None = None) -> ExportResult:
    """Write the SAE of folder `run` at `out` in format `fmt` ('saelens' or 'sparsify').

    layer: for RouteSAE and MLSAE, which routed layer the shared SAE is exported for (required);
    for single-layer SAEs it may repeat their layer."""
    if fmt not in FORMATS:
        raise RouteSAEError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    run, out = Path(run), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RouteSAEError(f"--out {out} exists and is not an empty folder; choose another")
    plan = _plan(run, layer)
    if fmt == "sparsify" and plan.sae.kind != "topk":
        raise RouteSAEError(f"sparsify holds top-k SAEs only; {run} is a {plan.sae.kind} SAE at inference (export it to saelens)")
    write = _write_saelens if fmt == "saelens" else _write_sparsify
    out.mkdir(parents=True, exist_ok=True)
    notes = write(plan, run, out)
    return ExportResult(out, plan.layer, notes)


def _plan(run: Path, layer: int | None) -> _Plan:
    sae = load_sae(run)
    config = sae.config
    raw = json.loads((run / "config.json").read_text())
    notes: list[str] = []
    if config.arch == "crosscoder":
        raise RouteSAEError("a crosscoder reads all its layers at once into one code: neither SAELens nor sparsify holds one")
    if sae.multi_layer:
        if layer is None:
            raise RouteSAEError(f"{run} is a {config.arch} over layers {list(config.layers)}: pass --layer, the one "
                                "to export its shared SAE for")
        if layer not in config.layers:
            raise RouteSAEError(f"--layer {layer} is not one of {run}'s layers {list(config.layers)}")
        if config.arch == "routesae":
            notes.append(f"RouteSAE's router is not exported: this is its shared SAE, labelled for hidden_states[{layer}], "
                         "encoding that layer as if the router sent it there with weight 1 (RouteSAE itself scales "
                         "the input by the router's p)")
        else:
            notes.append(f"{config.arch}'s shared dictionary, labelled for hidden_states[{layer}] (it reads every routed layer alike)")
    elif layer is not None and layer != config.layers[0]:
        raise RouteSAEError(f"{run} reads hidden_states[{config.layers[0]}], not --layer {layer}")
    layer = config.layers[0] if layer is None else layer
    coder_name = type(sae).coder_name
    if coder_name not in KIND_OF_CODER:
        raise RouteSAEError(f"coder {coder_name!r} has no counterpart in SAELens or sparsify")
    kind = KIND_OF_CODER[coder_name]
    if coder_name in ("batchtopk", "matryoshka"):
        notes.append(f"{coder_name}'s batch-wide top-k is training-only: at inference it is a JumpReLU with one threshold "
                     f"({float(sae.coder.threshold):.6g}) for every latent, exported as such")
    portable = from_routesae_tensors(kind, sae.coder.export_tensors(), getattr(sae.coder, "k", None))
    scale = None
    if config.normalization == "dataset":
        scale = float(config.dataset_scale[config.layers.index(layer)])  # type: ignore[index]
    record = raw.get("reuse") or sae_record(config)
    return _Plan(portable, layer, config.normalization, scale, record, dict(config.model or {}), notes)


def _routesae_block(plan: _Plan, run: Path, notes: list[str], **fields: Any) -> dict[str, Any]:
    """What routesae writes beside the format's own fields (read back by `routesae import`):
    input_normalization is the routesae normalization the exported SAE with its format's own
    normalization stands for ('token' or 'none': a 'dataset' scale is folded into the weights)."""
    return {"exported_by": f"routesae {__version__}", "from": str(run.resolve()), "hidden_states": plan.layer,
            "input_normalization": "token" if plan.normalization == "token" else "none", **fields,
            "notes": notes, "reuse": plan.record}


def _hooks(plan: _Plan) -> HookNames:
    return hook_names(plan.layer, plan.model.get("n_layers"), plan.model.get("architecture"))


def _write_saelens(plan: _Plan, run: Path, out: Path) -> list[str]:
    notes = list(plan.notes)
    p = plan.sae
    norm, folded = "none", None
    if plan.normalization == "dataset":
        p = p.scaled_input(plan.scale)  # type: ignore[arg-type]
        notes.append(f"'dataset' normalization (x * {plan.scale:g}) folded into the weights: reads raw activations")
    elif plan.normalization == "token":
        folded = math.sqrt(p.d_in / (p.d_in - 1))
        p = p.scaled_input(folded)
        norm = "layer_norm"
        notes.append(
            f"'token' normalization exported as SAELens 'layer_norm' with sqrt(d/(d-1)) = {folded:.8f} folded into the weights "
            f"(SAELens divides by the unbiased std + {SAELENS_LAYER_NORM_EPS:g}, routesae by the population std + {EPS:g}): "
            f"the epsilons still differ by about 1e-5 / std(x), relative; {FLIP_NOTE}"
        )
    arch = SAELENS_ARCH[p.kind]
    tensors = _saelens_tensors(p, arch)
    names = _hooks(plan)
    if names.transformer_lens is None:
        notes.append(f"hidden_states[{plan.layer}] is after the final norm: no TransformerLens hook names it (hook_name null)")
    record = plan.record
    meta = {
        "sae_lens_version": SAELENS_CONFIG_VERSION,
        "sae_lens_training_version": None,
        "model_name": hub_id(plan.model) or plan.model.get("id"),
        "hook_name": names.transformer_lens,
        "hook_head_index": None,
        "hf_hook_name": names.hf_module if names.hf_point == "output" else None,
        "context_size": record.get("context_len"),
        "prepend_bos": record.get("prepend_bos"),
        "dataset_path": (record.get("dataset") or {}).get("id") if isinstance(record.get("dataset"), dict) else record.get("dataset"),
        "exclude_special_tokens": record.get("special_tokens_excluded"),
        # layer_norm_factor: the sqrt(d/(d-1)) folded in, which an import divides back out
        "routesae": _routesae_block(plan, run, notes, layer_norm_factor=folded),
    }
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": p.d_in,
        "d_sae": p.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,  # routesae subtracts b_dec before encoding
        "normalize_activations": norm,
        "reshape_activations": "none",
        **({"k": p.k, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {}),
        "metadata": meta,
    }
    write_safetensors(out / "sae_weights.safetensors", tensors, {"format": "pt"})
    write_json(out / "cfg.json", cfg)
    return notes


def _saelens_tensors(p: PortableSAE, arch: str) -> dict[str, Any]:
    values = {"W_enc": p.W_enc, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec, "threshold": p.threshold,
              "b_gate": p.b_gate, "b_mag": p.b_mag, "r_mag": p.r_mag}
    return {name: values[name].float().contiguous() for name in SAELENS_TENSORS[arch]}  # type: ignore[union-attr]


def _write_sparsify(plan: _Plan, run: Path, out: Path) -> list[str]:
    notes = list(plan.notes)
    p = plan.sae
    if plan.normalization == "dataset":
        p = p.scaled_input(plan.scale)  # type: ignore[arg-type]
        notes.append(f"'dataset' normalization (x * {plan.scale:g}) folded into the weights: reads raw activations")
    elif plan.normalization == "token":
        notes.append(
            f"sparsify has no input normalization: this SAE reads per-token normalized inputs, x_norm = (x - mean(x)) / "
            f"(std(x) + {EPS:g}) (population std over d_in), and its x_hat must be mapped back: x_hat * (std(x) + {EPS:g}) + mean(x)"
        )
    names = _hooks(plan)
    if names.sparsify is None:
        notes.append(f"hidden_states[{plan.layer}] has no sparsify hookpoint (embeddings or after the final norm)")
    cfg: dict[str, Any] = {
        "activation": "topk",
        "expansion_factor": max(1, p.d_sae // p.d_in),  # ignored: num_latents is set
        "normalize_decoder": True,
        "num_latents": p.d_sae,
        "k": p.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": p.d_in,
    }
    tensors = {"encoder.weight": p.W_enc.T.contiguous(), "encoder.bias": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec}
    write_safetensors(out / "sae.safetensors", tensors, {"format": "pt"})  # type: ignore[arg-type]
    # Only sparsify's own fields in cfg.json: it drops any other key with a logged warning on every load.
    write_json(out / SIDE_FILE, _routesae_block(plan, run, notes, hookpoint=names.sparsify))
    write_json(out / "cfg.json", cfg)
    return notes
