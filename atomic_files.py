"""Files and folders written whole, for every stage: each goes to a temporary name beside its
destination and is renamed over it at the end, so a kill at any moment leaves either the old
file or the new one, never half of one. The one place this pattern is written."""

from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator


def temp_name(path: Path) -> Path:
    """A hidden sibling of `path` that no other process or thread writing `path` picks."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one temp_name gives (a leftover of a killed write)."""
    return name.startswith(".") and name.endswith(".tmp")


def atomic_write(path: Path | str, write: Callable[[Path], None], *, durable: bool = True) -> Path:
    """Run write(tmp), then rename tmp over `path`; tmp is removed if anything fails.

    durable: fsync the file before the rename, so it survives a power cut as well as a kill
    (shards of a store skip it: they are many and large, and a kill is what they must survive)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path | str, text: str, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def write_json(path: Path | str, obj: Any, *, indent: int | None = 2, durable: bool = True) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", durable=durable)


@contextmanager
def atomic_open(path: Path | str, mode: str = "w", *, durable: bool = True) -> Iterator[IO[Any]]:
    """`with atomic_open(p) as f: f.write(...)`: the file appears at `p` when the block ends without
    an exception, and not at all otherwise (for files written piece by piece, such as JSON lines)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', not {mode!r}")
    encoding = None if "b" in mode else "utf-8"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """`with atomic_directory(out) as tmp: fill tmp`: tmp becomes `out` when the block ends without
    an exception. `out` must be absent or an empty folder; a failed fill leaves nothing behind."""
    path = Path(path)
    tmp = temp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            path.rmdir()  # only an empty folder may stand in the way
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_figure(fig: Any, path: Path | str, dpi: int = 110) -> Path:
    """Write a matplotlib figure as a PNG, whole, and close it (its memory is pyplot's otherwise)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"), durable=False)
    finally:
        plt.close(fig)
