"""Goodfire's released SAEs (Llama-3.1-8B-Instruct l19, Llama-3.3-70B-Instruct l50): a `.pt`/`.pth`
state dict with `encoder_linear.{weight,bias}` and `decoder_linear.{weight,bias}`.

f = ReLU(x W_e^T + b_e), x_hat = f W_d^T + b_d: ReLU, no b_dec subtraction, no input
normalization; nn.Linear orientation (encoder [d_sae, d_in], decoder [d_in, d_sae]), checked against
the bias lengths. `lN` in the file name is the output of model.layers[N], hidden_states[N + 1].
Goodfire's tied BatchTopK (R1, one `W`) is not this format and is refused."""

from __future__ import annotations

from pathlib import Path

from routesae.errors import RouteSAEError
from routesae.model.hook_names import from_goodfire_filename
from routesae.interop.portable import PortableSAE
from routesae.interop.source import Source
from routesae.interop.weights import dtype_name, oriented, read_safetensors, read_torch, require, vector

NAMES = ("encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias")


def read(path: Path) -> Source:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth"))
        if len(files) != 1:
            raise RouteSAEError(f"{path} is a folder; pass the Goodfire .pt/.pth file itself")
        path = files[0]
    if not path.is_file():
        raise RouteSAEError(f"no file at {path}")
    tensors = read_safetensors(path) if path.suffix == ".safetensors" else read_torch(path, "Goodfire SAE checkpoint")
    if "W" in tensors and "encoder_linear.weight" not in tensors:
        raise RouteSAEError(f"{path} holds one tied matrix W (Goodfire's tied BatchTopK): not supported")
    require(tensors, NAMES, path, "Goodfire SAE")
    b_enc, b_dec = tensors["encoder_linear.bias"], tensors["decoder_linear.bias"]
    d_sae, d_in = int(b_enc.shape[-1]), int(b_dec.shape[-1])
    W_enc = oriented(tensors["encoder_linear.weight"], d_in, d_sae, "encoder_linear.weight", path)
    W_dec = oriented(tensors["decoder_linear.weight"], d_sae, d_in, "decoder_linear.weight", path)
    sae = PortableSAE("relu", W_enc, W_dec, vector(b_dec, d_in, "decoder_linear.bias", path), subtracts_b_dec=False,
                      b_enc=vector(b_enc, d_sae, "encoder_linear.bias", path))
    layer = from_goodfire_filename(path.stem)
    return Source(
        "goodfire", sae, [path], dtype_name({n: tensors[n] for n in NAMES}),
        layer=layer, hook=f"l{layer - 1}" if layer is not None else None,
        conventions=[
            "Goodfire: f = ReLU(x W_e^T + b_e), x_hat = f W_d^T + b_d; no b_dec subtraction (folded into b_enc), "
            "no input normalization",
            *([f"file name 'l{layer - 1}' = output of model.layers[{layer - 1}] = hidden_states[{layer}]"]
              if layer is not None else []),
        ],
    )
