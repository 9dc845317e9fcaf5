"""The tokens a latent's decoder direction promotes and suppresses: `W_U @ W_dec[latent]` through
the model's unembedding (the dashboard's logit-lens table, as SAEDashboard and Neuronpedia show it).

The model's output embedding is read alone (model/unembedding.py), then every asked-for latent
goes through it in a few batched matmuls."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from routesae.errors import RouteSAEError
from routesae.sae_folders import weights_digest

CHUNK = 256
"""Latents per matmul: [CHUNK, vocab] float32 logits stay near 50 MB for a 49k vocabulary."""


@dataclass
class LatentTokens:
    """One latent's strongest and weakest unembedded tokens."""

    top: list[tuple[int, float]]
    """(token id, logit), largest first."""
    bottom: list[tuple[int, float]]
    """(token id, logit), smallest first."""


@dataclass
class Unembedding:
    """What the dashboard shows under "decoder direction": per latent, or why there is nothing."""

    latents: dict[int, LatentTokens]
    """Per latent asked for; empty when skipped."""
    note: str
    """How the direction was taken (or why it was skipped), shown on every page."""


def decoder_directions(tensors: dict[str, torch.Tensor], layers: list[int]) -> tuple[torch.Tensor | None, str]:
    """[n_latents, d] decoder rows from an SAE's exported (SAELens-named) tensors, and a note.

    A multi-layer decoder (crosscoder: W_dec [d_sae, n_layers, d_in]) gives its last layer's rows:
    the one nearest the unembedding."""
    w = tensors.get("W_dec")
    if w is None:
        return None, "skipped: the SAE exports no W_dec"
    if w.ndim == 3:
        where = f"hidden state {layers[-1]}" if len(layers) == w.shape[1] else "its last layer"
        return w[:, -1, :].float(), f"W_U @ W_dec[latent] of the decoder's last layer ({where}); no final norm"
    if w.ndim != 2:
        return None, f"skipped: W_dec has shape {tuple(w.shape)}"
    return w.float(), "W_U @ W_dec[latent] (the logit lens of the decoder direction; no final norm)"


def top_bottom_tokens(directions: torch.Tensor, w_u: torch.Tensor, n: int = 10,
                      chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """directions [m, d], w_u [vocab, d] -> (top ids, top logits, bottom ids, bottom logits), each [m, n]:
    logits = directions @ w_u.T, chunk latents at a time."""
    n = min(n, w_u.shape[0])
    w_t = w_u.float().T.contiguous()
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for a in range(0, directions.shape[0], chunk):
            logits = directions[a:a + chunk].float() @ w_t
            top = logits.topk(n, dim=1)
            bottom = logits.topk(n, dim=1, largest=False)
            parts.append((top.indices, top.values, bottom.indices, bottom.values))
    if not parts:
        empty_i, empty_v = torch.zeros(0, n, dtype=torch.long), torch.zeros(0, n)
        return empty_i, empty_v, empty_i, empty_v
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]


def find_sae_folder(recorded: str, contexts_dir: Path, override: str | None) -> Path:
    """The SAE folder contexts.json names (relative paths are as `routesae contexts` was given them:
    tried from here, then from beside the contexts folder), or `override`."""
    if override is not None:
        return Path(override)
    path = Path(recorded)
    if path.is_absolute() or path.is_dir():
        return path
    for base in [contexts_dir.resolve(), *contexts_dir.resolve().parents]:
        if (base / path).is_dir():
            return base / path
    return path


def unembed_latents(sae_path: Path, sae_sha256: str | None, store_path: str, latents: list[int],
                    model: str | None, n: int = 10) -> Unembedding:
    """Top and bottom `n` unembedded tokens of each of `latents`' decoder directions.

    Refuses an SAE folder whose weights are not the ones contexts.json recorded, and a model of another
    revision than the SAE was trained on (load_store_unembedding)."""
    from routesae.model.unembedding import load_store_unembedding
    from routesae.train.load import load_sae

    if not sae_path.is_dir():
        raise RouteSAEError(f"no SAE folder at {sae_path} (named in contexts.json) for the decoder tokens; "
                            "pass --sae FOLDER, or --no-unembed")
    sae = load_sae(sae_path, "cpu")
    if sae_sha256 and weights_digest(sae_path) != sae_sha256:
        raise RouteSAEError(f"{sae_path}/sae.safetensors is not the SAE these contexts were made with "
                            "(weights sha256 differs); pass the right --sae, or --no-unembed")
    directions, note = decoder_directions(sae.export_tensors(), list(sae.config.layers))
    if directions is None:
        return Unembedding({}, note)
    recorded: dict[str, Any] = dict(sae.config.model)
    if not recorded.get("id") and model is None:
        raise RouteSAEError(f"{sae_path} records no model to unembed through; pass --model, or --no-unembed")
    w_u = load_store_unembedding(Path(store_path), recorded, model, "unembed through")
    if w_u.shape[1] != directions.shape[1]:
        raise RouteSAEError(f"the model's unembedding is {tuple(w_u.shape)}, the SAE's decoder rows have "
                            f"{directions.shape[1]} dimensions")
    index = torch.tensor(latents, dtype=torch.long)
    ti, tv, bi, bv = top_bottom_tokens(directions[index], w_u, n)
    out = {}
    for row, latent in enumerate(latents):
        out[latent] = LatentTokens(list(zip(ti[row].tolist(), tv[row].tolist())),
                                   list(zip(bi[row].tolist(), bv[row].tolist())))
    return Unembedding(out, note)
