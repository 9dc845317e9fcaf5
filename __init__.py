"""routesae: train and study sparse autoencoders on the residual stream of LLMs, RouteSAE first."""

__version__ = "0.1.0"

from routesae.errors import RouteSAEError
from routesae.store.zarr_store import Cache
from routesae.train.load import load_sae

__all__ = ["Cache", "RouteSAEError", "__version__", "load_sae"]
