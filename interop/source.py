"""What a format reader (goodfire.py, saelens.py, sparsify.py, gemmascope.py) hands the importer:
the SAE as portable equations, and what the files say about where and how it is used."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routesae.interop.portable import PortableSAE


@dataclass
class Source:
    """One SAE read from another toolkit's files."""

    format: str
    """'goodfire', 'saelens', 'sparsify' or 'gemmascope'."""
    sae: PortableSAE
    """Its weights and equations, in the SAE's own input space."""
    files: list[Path]
    """The files read (their sha256 is recorded)."""
    dtype: str
    """The weights' dtype in the files (routesae stores float32)."""
    layer: int | None = None
    """The hidden_states index the files name, translated from `hook`; None where they name none."""
    hook: str | None = None
    """The files' own name of the layer ('blocks.19.hook_resid_post', 'layers.19', 'l19', 'layer_19')."""
    scale: float | None = None
    """Where the files say the SAE reads x * scale (and its x_hat is divided back): that factor."""
    normalization: str = "none"
    """'token' where the SAE reads routesae's per-token normalized inputs (a routesae export says so), else 'none'."""
    model: str | None = None
    """The model the files name (SAELens's model_name), if any."""
    details: dict[str, Any] = field(default_factory=dict)
    """What else the files record about use: context size, dataset, BOS, the original config."""
    conventions: list[str] = field(default_factory=list)
    """One line per convention applied in reading (what the format's file means, as read here)."""
