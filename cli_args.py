"""Parsing of command-line values that several commands share."""

from __future__ import annotations

import re

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
