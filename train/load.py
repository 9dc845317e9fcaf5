"""Load a trained SAE from its folder: `load_sae("runs/NAME")`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from routesae.errors import RouteSAEError
from routesae.train.config import SAEConfig
from routesae.train.saes import ARCHITECTURES, SAE, build_sae


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """The SAE saved in folder `path` (sae.safetensors + config.json), in eval mode on `device`.

    The result is a torch.nn.Module with:
      sae.config           SAEConfig: arch ('routesae', or on one layer 'topk', 'batchtopk', 'vanilla',
                           'gated', 'jumprelu'), d_model, n_latents, k, layers (hidden_states
                           indices: one for single-layer SAEs, the routed list for routesae),
                           routing, aggregate, normalization, cache_fingerprint, model;
      sae.training_info    the "training" block of config.json (tokens seen, eval_range: the
                           held-out token range of the cache, ...);
      sae.encode(x)        model space -> dense latents [n, n_latents];
      sae.decode(z)        latents -> reconstruction in the normalized space;
      sae.reconstruct(x)   model space -> model space (RouteSAE: a RoutedReconstruction);
      RouteSAE also: sae.route(x), sae.reconstruct_with_probs(x, probs), sae.reconstruct_at(x, layer_index, weight).
    x is [..., d_model] for single-layer SAEs and [..., len(sae.config.layers), d_model] for the
    multi-layer ones (any leading dimensions: [n, ...] or [batch, seq, ...]; the outputs keep them).
    sae.coder holds the weights (train/coders/: W_enc, W_dec as [n_latents, d_model] rows, ...)."""
    folder = Path(path)
    config_path, weights_path = folder / "config.json", folder / "sae.safetensors"
    if not folder.is_dir():
        raise RouteSAEError(f"no SAE folder at {folder}")
    if not config_path.is_file() or not weights_path.is_file():
        raise RouteSAEError(f"{folder} holds no finished SAE (needs config.json and sae.safetensors)")
    try:
        raw = json.loads(config_path.read_text())
        config = SAEConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise RouteSAEError(f"{config_path} is not a valid SAE config ({e})") from None
    if config.arch not in ARCHITECTURES:
        raise RouteSAEError(f"{folder}: unknown architecture {config.arch!r} (known: {', '.join(sorted(ARCHITECTURES))})")
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise RouteSAEError(f"{weights_path} is unreadable ({e})") from None
    sae = build_sae(config)
    expected = sae.export_tensors()
    for name, t in expected.items():
        if name not in tensors or tensors[name].shape != t.shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise RouteSAEError(f"{weights_path}: tensor {name} should be {tuple(t.shape)}, found {got}")
    sae.load_exported(tensors)
    sae.training_info = raw.get("training", {})
    return sae.to(device).eval()
