"""Gemma Scope's JumpReLU SAEs: `params.npz` (or `params.safetensors`) with W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc, b_dec and threshold.

pre = x W_enc + b_enc, f = ReLU(pre) * 1[pre > threshold], x_hat = f W_dec + b_dec: no b_dec
subtraction (folded into b_enc), no input normalization. The files do not name their layer; the
release does: below a residual release's folder (gemma-scope-2b-pt-res, or the hub cache's
models--google--gemma-scope-2b-pt-res) the folder `layer_N` is blocks.N.hook_resid_post, hidden_states[N + 1].
Paths in MLP, attention or transcoder releases are refused; elsewhere --layer is needed."""

from __future__ import annotations

from pathlib import Path

from routesae.errors import RouteSAEError
from routesae.model.hook_names import from_gemmascope_folder
from routesae.interop.portable import PortableSAE
from routesae.interop.source import Source
from routesae.interop.weights import dtype_name, oriented, read_npz, read_safetensors, require, vector

NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
FILES = ("params.npz", "params.safetensors")


def read(path: Path) -> Source:
    if path.is_dir():
        found = [path / name for name in FILES if (path / name).is_file()]
        if not found:
            raise RouteSAEError(f"{path} holds no Gemma Scope params.npz or params.safetensors")
        path = found[0]
    if not path.is_file():
        raise RouteSAEError(f"no file at {path}")
    if path.suffix == ".npz":
        tensors = read_npz(path)
    elif path.suffix == ".safetensors":
        tensors = read_safetensors(path)
    else:
        raise RouteSAEError(f"{path} is neither a .npz nor a .safetensors file (Gemma Scope's params)")
    require(tensors, NAMES, path, "Gemma Scope SAE")
    b_enc, b_dec = tensors["b_enc"], tensors["b_dec"]
    d_sae, d_in = int(b_enc.shape[-1]), int(b_dec.shape[-1])
    sae = PortableSAE(
        "jumprelu", oriented(tensors["W_enc"], d_in, d_sae, "W_enc", path), oriented(tensors["W_dec"], d_sae, d_in, "W_dec", path),
        vector(b_dec, d_in, "b_dec", path), subtracts_b_dec=False, b_enc=vector(b_enc, d_sae, "b_enc", path),
        threshold=vector(tensors["threshold"], d_sae, "threshold", path),
    )
    layer, hook = _layer_from_path(path)
    return Source(
        "gemmascope", sae, [path], dtype_name({n: tensors[n] for n in NAMES}), layer=layer, hook=hook,
        conventions=[
            "Gemma Scope: pre = x W_enc + b_enc, f = ReLU(pre) * 1[pre > threshold], x_hat = f W_dec + b_dec; "
            "no b_dec subtraction (folded into b_enc), no input normalization",
            *([f"folder '{hook}' of a residual release = blocks.{layer - 1}.hook_resid_post = hidden_states[{layer}]"]
              if layer is not None else []),
        ],
    )


def _layer_from_path(path: Path) -> tuple[int | None, str | None]:
    """(hidden_states index, folder name) from a path inside a Gemma Scope release, else (None, None)."""
    releases = [p.lower() for p in path.resolve().parts if "gemma-scope" in p.lower() or "gemma_scope" in p.lower()]
    if any(s in p for p in releases for s in ("-mlp", "-att", "transcoder")):
        raise RouteSAEError(f"{path} is from a Gemma Scope MLP, attention or transcoder release: "
                            "routesae SAEs read the residual stream only")
    if not any("-res" in p for p in releases):
        return None, None
    for part in reversed(path.resolve().parts):
        layer = from_gemmascope_folder(part)
        if layer is not None:
            return layer, part
    return None, None
