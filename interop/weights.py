"""Reading other toolkits' weight files without running their code, and checking their shapes.

Files are read with safetensors, numpy (`allow_pickle=False`) or `torch.load(weights_only=True)`:
never by unpickling arbitrary objects. Orientation is decided from the shapes against d_in and
d_sae (known from the biases, which have one orientation), never from the name alone, and refused
when the two are equal."""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from routesae.errors import RouteSAEError


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for foreign or truncated files
        raise RouteSAEError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise RouteSAEError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None


def read_npz(path: Path) -> dict[str, Tensor]:
    """A numpy .npz archive of plain arrays (object arrays, which need pickle, are refused)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise RouteSAEError(f"{path} holds one array, not a .npz archive of named arrays")
            return {name: torch.from_numpy(np.array(archive[name])) for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise RouteSAEError(f"{path} is not a readable .npz archive of plain arrays ({_first_line(e)})") from None


def read_torch(path: Path, what: str) -> dict[str, Tensor]:
    """A state dict saved with torch.save, read with weights_only=True (tensors and plain containers
    only); one level of nesting under 'state_dict' or 'model' is looked through. `what` names the
    checkpoint expected ('Goodfire SAE checkpoint') in the one-line refusals."""
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (since torch 1.6) or a pickle (before; protocol 2+ opens with
    # 0x80): anything else is no torch file at all, and torch.load's own error would only say which
    # byte its unpickler tripped on.
    is_zip, is_pickle = head == b"PK\x03\x04", head[:1] == b"\x80"
    if not (is_zip or is_pickle):
        found = "it is empty" if not head else f"it starts with {head!r}"
        raise RouteSAEError(f"{path} is not a {what}: not a file torch.save writes (neither a zip archive nor a pickle; {found})")
    if is_zip and not _torch_archive(path):
        raise RouteSAEError(f"{path} is not a {what}: a zip archive without the data.pkl torch.save writes (a .npz or other archive?)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of anything but tensors and containers, or a damaged file
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise RouteSAEError(f"{path} is not a plain {what}: it pickles {refused.group(1)}, which "
                                "torch.load(weights_only=True) refuses to unpickle (only tensors and plain containers are read)") from None
        raise RouteSAEError(f"{path} is not a readable {what}: torch.load(weights_only=True) failed ({_first_line(e)})") from None
    if isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise RouteSAEError(f"{path} is not a {what}: it holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    return dict(obj)


def _torch_archive(path: Path) -> bool:
    """Whether a zip archive is torch.save's (one folder holding data.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def require(tensors: dict[str, Tensor], names: tuple[str, ...], where: Path, what: str) -> None:
    """Refuse a file that lacks any of `names`."""
    missing = [n for n in names if n not in tensors]
    if missing:
        have = ", ".join(sorted(tensors)[:8]) or "nothing"
        raise RouteSAEError(f"{where} is not a {what}: no {', '.join(missing)} (it holds {have})")


def dtype_name(tensors: dict[str, Tensor]) -> str:
    """The weights' dtype ('float32', 'bfloat16', ...; 'mixed' if they differ)."""
    kinds = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def vector(t: Tensor, n: int, name: str, where: Path) -> Tensor:
    """A [n] float32 vector (a [1, n] row is accepted)."""
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if tuple(t.shape) != (n,):
        raise RouteSAEError(f"{where}: {name} has shape {tuple(t.shape)}, expected ({n},): inconsistent shapes")
    return _float(t, name, where)


def oriented(t: Tensor, rows: int, cols: int, name: str, where: Path) -> Tensor:
    """`t` as a [rows, cols] float32 matrix, transposed if it is stored [cols, rows]; refused when
    rows == cols (the shapes cannot tell the orientation) or when neither shape fits."""
    if t.dim() != 2 or {tuple(t.shape), tuple(t.shape[::-1])} != {(rows, cols), (cols, rows)}:
        raise RouteSAEError(f"{where}: {name} has shape {tuple(t.shape)}, expected ({rows}, {cols}): inconsistent shapes")
    if rows == cols:
        raise RouteSAEError(
            f"{where}: {name} is square ({rows} x {cols}, d_in = d_sae), so its orientation cannot be told from the shapes"
        )
    return _float(t if tuple(t.shape) == (rows, cols) else t.T, name, where)


def _float(t: Tensor, name: str, where: Path) -> Tensor:
    if not t.is_floating_point():
        raise RouteSAEError(f"{where}: {name} is {t.dtype}, not floating point")
    out = t.detach().to(torch.float32).contiguous()
    if not torch.isfinite(out).all():
        raise RouteSAEError(f"{where}: {name} holds NaN or infinite values")
    return out
