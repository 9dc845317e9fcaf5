"""Parsing of command-line values that several commands share."""

from __future__ import annotations

import re
from typing import Any, Callable

import click

from routesae.errors import RouteSAEError

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str, what: str = "the count") -> int:
    """'20000', '20_000', '250k', '1.5M', '2B' -> int; `what` names the option in the error."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise RouteSAEError(f"{what} must be a count such as 20000, 250k, 1.5M or 2B; got {text!r}")
    value = float(m.group(1).replace("_", "")) * _SUFFIXES[m.group(2).lower()]
    if value != int(value):
        raise RouteSAEError(f"{what} must be a whole number; got {text!r}")
    return int(value)


def sae_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--sae PATH` (repeatable) and plain PATH arguments: the SAEs a command reads. The command
    gets `saes` and `more_saes`; `sae_paths` joins and expands them."""
    command = click.argument("more_saes", nargs=-1, metavar="[PATH]...")(command)
    return click.option("--sae", "saes", multiple=True, metavar="PATH",
                        help="SAE folder (or a fit output folder holding several); more may follow as plain arguments."
                        )(command)


def sae_paths(saes: tuple[str, ...], more_saes: tuple[str, ...]) -> list[str]:
    from routesae.sae_folders import expand_sae_paths

    paths = expand_sae_paths([*saes, *more_saes])
    if not paths:
        raise RouteSAEError("no SAE given: pass --sae PATH [PATH...]")
    return paths


def rerun_model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--model`, `--device` and `--dtype` of a command that reruns the model its SAEs record: the
    command gets `model`, `device` and `dtype` (model/compute_dtype.py's rule for 'auto')."""
    from routesae.model.compute_dtype import CHOICES

    options = (
        click.option("--model", default=None,
                     help="Load the model from here instead of the SAEs' recorded model id (same revision)."),
        click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N."),
        click.option("--dtype", type=click.Choice(CHOICES), default="auto", show_default=True,
                     help="The model's compute dtype. auto: the recorded dtype where the device multiplies it "
                     "natively (CPU: AVX512-BF16/AMX; CUDA: Ampere on), else float32."),
    )
    for option in reversed(options):
        command = option(command)
    return command
