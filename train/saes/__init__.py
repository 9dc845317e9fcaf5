"""SAE architectures, registered by name: which layers an SAE reads (one file each: single.py,
route.py) times how it makes its code sparse (coders/, one file each). A new reader is a file
that subclasses `SAE` with `@register`, plus one import line here; a new single-layer
architecture is a few lines in single.py naming its coder."""

from routesae.train.saes.base import ARCHITECTURES, SAE, TrainOutput, register
from routesae.train.saes import single  # noqa: F401  (registers "topk", "batchtopk", "vanilla", "gated", "jumprelu")
from routesae.train.saes import route  # noqa: F401  (registers "routesae")
from routesae.train.saes import mlsae  # noqa: F401  (registers "mlsae")
from routesae.train.saes import crosscoder  # noqa: F401  (registers "crosscoder")

from routesae.train.config import SAEConfig


def build_sae(config: SAEConfig, generator=None) -> SAE:
    """A freshly initialised SAE of `config.arch`."""
    if config.arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {config.arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[config.arch](config, generator)


__all__ = ["ARCHITECTURES", "SAE", "TrainOutput", "build_sae", "register"]
