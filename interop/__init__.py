"""SAEs from other toolkits in, routesae SAEs out.

import: Goodfire, SAELens, sparsify and Gemma Scope files become ordinary routesae SAE folders
(importer.py, one reader per format: goodfire.py, saelens.py, sparsify.py, gemmascope.py);
export: routesae SAE folders become SAELens or sparsify folders (export.py). The conventions of
each format are in docs/formats-interop.md. What every SAE folder records for use elsewhere (hook
names, hub id, normalization) is routesae.sae_record; the layer names of each toolkit,
routesae.model.hook_names."""

from typing import Any

__all__ = ["export_sae", "import_sae"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package should not load the format readers (and torch) with it.
    if name == "export_sae":
        from routesae.interop.export import export_sae

        return export_sae
    if name == "import_sae":
        from routesae.interop.importer import import_sae

        return import_sae
    raise AttributeError(name)
