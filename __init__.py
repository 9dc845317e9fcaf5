"""routesae: train and study sparse autoencoders on the residual stream of LLMs, RouteSAE first."""

from __future__ import annotations

from typing import Any

from routesae.errors import RouteSAEError

__version__ = "0.1.0"
__all__ = ["Cache", "RouteSAEError", "__version__", "load_sae"]


def __getattr__(name: str) -> Any:
    # Cache and load_sae import torch: loaded on first use, so the command line's parsing and
    # --help do not pay for it.
    if name == "Cache":
        from routesae.store.zarr_store import Cache

        return Cache
    if name == "load_sae":
        from routesae.train.load import load_sae

        return load_sae
    raise AttributeError(f"module 'routesae' has no attribute {name!r}")
