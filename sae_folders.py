"""SAE folders on disk, as every command that reads SAEs takes them: expanding a fit's output
folder, loading, checking against a store, and picking the store tokens the SAEs never trained on.
Shared by eval, contexts and the later stages."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from routesae.errors import RouteSAEError
from routesae.store.zarr_store import Cache


def expand_sae_paths(paths: list[str]) -> list[str]:
    """SAE folders as given; a fit output folder holding several SAEs (subfolders with a
    config.json, and none of its own) stands for all of them."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise RouteSAEError(f"no SAE at {p}")
        if path.is_dir() and not (path / "config.json").is_file():
            subs = sorted(d for d in path.iterdir() if d.is_dir() and (d / "config.json").is_file())
            if subs:
                out.extend(str(d) for d in subs)
                continue
        out.append(p)
    return out


class LoadedSAE(NamedTuple):
    """An SAE folder, loaded."""

    name: str
    path: Path
    sae: torch.nn.Module
    training: dict[str, Any]
    """The 'training' record fit saved in config.json (ranges, arguments); {} if absent."""


def load_saes(paths: list[str], device: torch.device) -> list[LoadedSAE]:
    from routesae.train.load import load_sae

    if not paths:
        raise RouteSAEError("no SAE given: pass one or more SAE folders to --sae")
    out = []
    names: set[str] = set()
    for p in paths:
        path = Path(p)
        sae = load_sae(path, device=device).requires_grad_(False)
        training: dict[str, Any] = dict(getattr(sae, "training_info", None) or {})
        name = path.resolve().name
        if name in names:  # two runs/x/topk-k32: qualify with the parent folder
            name = f"{path.resolve().parent.name}/{name}"
        names.add(name)
        out.append(LoadedSAE(name, path, sae, training))
    return out


def check_compatible(s: LoadedSAE, cache: Cache) -> None:
    """Refuse an SAE trained on another model, width or layers than the store holds."""
    cfg = s.sae.config
    theirs, mine = cfg.model or {}, cache.model
    for key in ("id", "revision"):
        if theirs.get(key) != mine.get(key):
            raise RouteSAEError(
                f"{s.name} was trained on model {theirs.get('id')!r} (revision {theirs.get('revision')}), "
                f"but {cache.path} holds {mine.get('id')!r} (revision {mine.get('revision')})"
            )
    if cfg.d_model != cache.d_model:
        raise RouteSAEError(f"{s.name} reads d_model {cfg.d_model}, the store holds {cache.d_model}")
    missing = [layer for layer in cfg.layers if layer not in cache.layers]
    if missing:
        raise RouteSAEError(f"{s.name} reads layers {list(cfg.layers)}; the store has no layer {missing} (it holds {cache.layers})")


def held_out_range(cache: Cache, saes: list[LoadedSAE], all_tokens: bool = False, tokens: int | None = None
                   ) -> tuple[int, int]:
    """Store tokens to evaluate: whole contexts of the held-out tail common to all SAEs (or of the
    whole store), capped by tokens."""
    ctx, n = cache.context_len, cache.n_tokens
    if all_tokens:
        start = 0
    else:
        start = 0
        for s in saes:
            if s.sae.config.cache_fingerprint != cache.fingerprint:
                raise RouteSAEError(
                    f"{s.name} was trained on another store (fingerprint {s.sae.config.cache_fingerprint}, "
                    f"{cache.path} is {cache.fingerprint}): its held-out tail is not in this one; pass --all-tokens "
                    "to evaluate on this whole store (one harvested separately for evaluation)"
                )
            rng = s.training.get("eval_range")
            if not rng:
                raise RouteSAEError(f"{s.name} records no held-out range (config.json 'training.eval_range'); pass --all-tokens")
            start = max(start, int(rng[0]))
        start = math.ceil(start / ctx) * ctx  # splicing needs whole contexts
    stop = n // ctx * ctx
    if stop <= start:
        raise RouteSAEError(
            f"the held-out tail of {cache.path} is empty (tokens {start:,}..{n:,} hold no whole context of {ctx}); "
            "fit with --eval-tokens above 0, or pass --all-tokens with a store harvested for evaluation"
        )
    if tokens is not None:
        if tokens < ctx:
            raise RouteSAEError(f"--tokens {tokens} is less than one context of {ctx} tokens")
        stop = min(stop, start + tokens // ctx * ctx)
    return start, stop


def weights_digest(folder: Path) -> str:
    """sha256 of an SAE folder's sae.safetensors: which trained weights an output was made from."""
    h = hashlib.sha256()
    with open(folder / "sae.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
