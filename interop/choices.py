"""The formats `routesae import` and `routesae export` offer, apart from the readers and writers
behind them, so `--help` loads no torch. importer.py and export.py import them from here (a test
holds importer.READERS to exactly IMPORT_FORMATS)."""

from __future__ import annotations

IMPORT_FORMATS = ("goodfire", "saelens", "sparsify", "gemmascope")
"""Toolkits whose SAE files `routesae import` reads, in the order --help lists them."""
EXPORT_FORMATS = ("saelens", "sparsify")
"""Toolkits whose SAE folders `routesae export` writes."""
