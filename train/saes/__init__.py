"""SAE architectures, one file each, registered by name: a new architecture is a file that
subclasses `SAE` with `@register`, plus one import line here."""

from routesae.train.saes.base import ARCHITECTURES, SAE, TrainOutput, register
from routesae.train.saes import topk  # noqa: F401  (registers "topk")
from routesae.train.saes import route  # noqa: F401  (registers "routesae")

from routesae.train.config import SAEConfig


def build_sae(config: SAEConfig, generator=None) -> SAE:
    """A freshly initialised SAE of `config.arch`."""
    if config.arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {config.arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[config.arch](config, generator)


__all__ = ["ARCHITECTURES", "SAE", "TrainOutput", "build_sae", "register"]
