"""Where a store lives: a local folder (a `Path`) or a prefix on object storage (`s3://bucket/key`,
or any other fsspec URL), as a `RemotePath` that answers the few `Path` methods the store code
uses (joining, existence, size, ranged reads); listing is `file_sizes`.

Remote stores go through zarr's own fsspec store for everything zarr reads and writes, and through
the same fsspec filesystem for the rest (file checks, the metadata read before zarr opens the
group, removal). Credentials and endpoints come from the environment only (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ... as botocore reads them); nothing here takes or writes
a key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Union

from routesae.errors import RouteSAEError


def is_url(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a remote location (`s3://...`, `gs://...`), not a local path."""
    text = os.fspath(spec)
    return "://" in text and not text.startswith("file://")


_NO_LISTING_CACHE = {"s3": {"use_listings_cache": False}, "s3a": {"use_listings_cache": False}}


class RemotePath:
    """A key (file) or prefix (folder) on object storage, Path-like enough for the store code."""

    def __init__(self, fs: Any, key: str, protocol: str):
        self.fs = fs
        self.key = key.rstrip("/")
        self.protocol = protocol

    @classmethod
    def from_url(cls, url: str) -> "RemotePath":
        import fsspec

        protocol, _, key = url.partition("://")
        try:
            # No listing cache: other processes (the other ranks, a harvest still writing) change
            # the store under us, and a stale listing would hide their files.
            fs = fsspec.filesystem(protocol, **_NO_LISTING_CACHE.get(protocol, {}))
        except (ImportError, ValueError) as e:
            hint = " (pip install s3fs)" if protocol in ("s3", "s3a") else ""
            raise RouteSAEError(f"cannot open {url}: no filesystem for {protocol}://{hint} ({e})") from None
        return cls(fs, key, protocol)

    # --- Path-like ----------------------------------------------------------------------------
    def __truediv__(self, part: str) -> "RemotePath":
        return RemotePath(self.fs, f"{self.key}/{part}", self.protocol)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.fs, self.key.rsplit("/", 1)[0], self.protocol)

    def exists(self) -> bool:
        return self.fs.exists(self.key)

    def is_file(self) -> bool:
        return self.fs.isfile(self.key)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.key)

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=int(self.fs.size(self.key)))

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def open(self, mode: str = "rb") -> Any:
        return self.fs.open(self.key, mode)

    def resolve(self) -> "RemotePath":
        return self


StorePath = Union[Path, RemotePath]


def store_path(spec: str | os.PathLike) -> StorePath:
    """A store's location from what a user typed: a URL becomes a RemotePath, anything else a Path."""
    if isinstance(spec, RemotePath):
        return spec
    text = os.fspath(spec)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return RemotePath.from_url(text) if is_url(text) else Path(text)


def file_sizes(location: StorePath) -> Iterator[tuple[str, int]]:
    """(path relative to `location`, size in bytes) of every file under it (one listing remotely)."""
    if isinstance(location, Path):
        for f in location.rglob("*"):
            if f.is_file():
                yield str(f.relative_to(location)), f.stat().st_size
        return
    for key, info in location.fs.find(location.key, detail=True).items():
        yield key[len(location.key) + 1 :], int(info["size"])


def zarr_store(location: StorePath, read_only: bool = False) -> Any:
    """What zarr.open_group takes for `location`: the folder's path, or zarr's fsspec store."""
    if isinstance(location, Path):
        return str(location)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(location), read_only=read_only,
                                storage_options=_NO_LISTING_CACHE.get(location.protocol))


def remove_tree(location: StorePath) -> None:
    """Delete a store and everything under it."""
    if isinstance(location, Path):
        shutil.rmtree(location)
    else:
        location.fs.rm(location.key, recursive=True)
