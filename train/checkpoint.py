"""Files a fit writes, always whole (through routesae.atomic_files): a kill at any moment leaves
either the old file or the new one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from routesae.atomic_files import atomic_write
from routesae.errors import RouteSAEError

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        # safetensors creates its file 0600; give it the mode open() gives the JSON beside it
        os.chmod(tmp, 0o666 & ~_umask())

    atomic_write(path, write)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Model, optimizer and loader state of a fit, as one file."""
    atomic_write(path, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, without a traceback
        raise RouteSAEError(f"{path} is not a readable checkpoint ({type(e).__name__}); move it away to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RouteSAEError(f"{path} is not a routesae fit checkpoint of format {CHECKPOINT_FORMAT}")
    return payload
