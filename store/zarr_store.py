"""The activation store: a Zarr v3 group laid out as cache_schema.md fixes.

`StoreWriter` is the only code that writes a store; `Cache` is what every later stage reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar

import numpy as np
import torch
import zarr
from zarr.core.buffer.cpu import NDBuffer
from zarr.codecs import BloscCodec

from routesae.errors import RouteSAEError
from routesae.store.shard_files import VERIFY_HINT, ShardFiles, check_row_indices

SCHEMA_VERSION = 1
ATTR_KEY = "routesae"
# Storage dtypes by name; bfloat16 has no Zarr v3 core type, so its bits live in uint16.
ZARR_DTYPES = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMPRESSIONS = ("none", "blosc-zstd")
TOKEN_ARRAYS = ("token_ids", "positions", "special")
_T = TypeVar("_T")


@dataclass(frozen=True)
class StoreLayout:
    """How tokens are cut into chunks and shards on disk."""

    chunk_tokens: int
    """Tokens per inner chunk (the unit a reader decompresses); a multiple of the context length."""
    shard_tokens: int
    """Tokens per shard file (the unit of writing and of commit); a multiple of chunk_tokens."""
    compression: str = "none"
    """Activations: 'none' or 'blosc-zstd' (byte shuffle + zstd level 1, lossless)."""


def plan_layout(
    context_len: int,
    d_model: int,
    n_layers: int,
    itemsize: int,
    batch_contexts: int,
    shard_tokens: int | None = None,
    shard_bytes: int = 128 << 20,
    min_chunk_bytes: int = 1 << 20,
    compression: str = "none",
) -> StoreLayout:
    """Pick chunk and shard sizes: chunks of whole contexts and at least ~1 MiB; shards of whole
    chunks and whole forward batches (so a resumed harvest replays identical batches), about
    shard_bytes over all layers, since the harvest holds a few shards in RAM."""
    chunk_contexts = max(1, math.ceil(min_chunk_bytes / (context_len * d_model * itemsize)))
    step = math.lcm(chunk_contexts, batch_contexts)
    if shard_tokens is None:
        shard_tokens = shard_bytes // (n_layers * d_model * itemsize)
    shard_contexts = step * max(1, round(shard_tokens / (step * context_len)))
    return StoreLayout(chunk_contexts * context_len, shard_contexts * context_len, compression)


class LayerStats(NamedTuple):
    """Statistics of one layer over the non-special tokens of a store."""

    count: int
    mean: torch.Tensor
    mean_sq_norm: float
    mean_norm: float


class StatsAccumulator:
    """Running float64 sums per layer; exact to resume because JSON round-trips float64."""

    def __init__(self, layers: list[int], d_model: int, state: dict[str, Any] | None = None):
        self.layers = list(layers)
        self.count = 0
        self.sum = np.zeros((len(layers), d_model), dtype=np.float64)
        self.sum_sq_norm = np.zeros(len(layers), dtype=np.float64)
        self.sum_norm = np.zeros(len(layers), dtype=np.float64)
        if state:
            self.count = int(state["count"])
            self.sum[:] = np.asarray(state["sum"], dtype=np.float64)
            self.sum_sq_norm[:] = state["sum_sq_norm"]
            self.sum_norm[:] = state["sum_norm"]

    def add(self, acts: torch.Tensor, keep: torch.Tensor) -> None:
        """acts: [n_layers, n_tokens, d_model] as the model computed them; keep: [n_tokens] bool.

        One batch is summed in float32 on the activations' device (a matmul, so cheap beside the
        forward); batches accumulate in float64."""
        w = keep.to(acts.device, torch.float32)
        self.count += int(keep.sum())
        for i in range(len(self.layers)):  # one layer at a time bounds the float32 copy
            x = acts[i].float()
            sq = x.pow(2).sum(-1)
            self.sum[i] += (w @ x).double().cpu().numpy()
            self.sum_sq_norm[i] += float(w @ sq)
            self.sum_norm[i] += float(w @ sq.sqrt())

    def state(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "sum_sq_norm": self.sum_sq_norm.tolist(),
            "sum_norm": self.sum_norm.tolist(),
        }


def _read_attrs(path: Path) -> dict[str, Any]:
    meta_file = path / "zarr.json"
    if not meta_file.is_file():
        raise RouteSAEError(f"{path} is not a routesae store (no zarr.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise RouteSAEError(f"{path}: unreadable store metadata ({e})") from None
    attrs = meta.get("attributes", {}).get(ATTR_KEY)
    if attrs is None:
        raise RouteSAEError(f"{path} is a Zarr store but not a routesae activation store")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise RouteSAEError(
            f"{path} has schema version {attrs.get('schema_version')}; this routesae reads {SCHEMA_VERSION}"
        )
    return attrs


def _act_name(layer: int) -> str:
    return f"acts/{layer}"


def shard_rows(array: zarr.Array) -> int:
    """Tokens per file of a [tokens, ...] array: its shard length, or its chunk length if unsharded."""
    return int((array.shards or array.chunks)[0])


def shard_path(array_dir: Path, array: zarr.Array, shard: int) -> Path:
    """The file holding shard (or chunk) `shard` of a [tokens, ...] array: zarr's default chunk keys."""
    return array_dir / "c" / "/".join([str(shard), *("0" for _ in array.shape[1:])])


def first_line(e: BaseException) -> str:
    """An exception's first sentence (codecs append the stored and computed bytes to theirs)."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(e).__name__


def _shard_files(path: Path, arrays: dict[int, zarr.Array]) -> dict[int, ShardFiles | None]:
    """Per layer, direct access to its shard files when stored uncompressed (shard_files.py says why)."""
    return {layer: ShardFiles.for_array(arr, path / _act_name(layer)) for layer, arr in arrays.items()}


class StoreWriter:
    """Writes shards of a store and commits them; one writer per shard, ever."""

    def __init__(self, path: Path, group: zarr.Group, attrs: dict[str, Any]):
        self.path = path
        self.group = group
        self.attrs = attrs
        self.layers: list[int] = attrs["layers"]
        self.layout = StoreLayout(**attrs["layout"])
        self.arrays = {layer: group[_act_name(layer)] for layer in self.layers}
        self.files = _shard_files(path, self.arrays)
        self.token_ids = group["token_ids"]
        self.positions = group["positions"]
        self.special = group["special"]

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        provenance: dict[str, Any],
        layers: list[int],
        d_model: int,
        storage_dtype: str,
        capacity_tokens: int,
        layout: StoreLayout,
    ) -> "StoreWriter":
        """Make an empty store sized for capacity_tokens; nothing is committed yet."""
        path = Path(path)
        if storage_dtype not in ZARR_DTYPES:
            raise RouteSAEError(f"storage dtype {storage_dtype!r} not supported: {sorted(ZARR_DTYPES)}")
        if layout.compression not in COMPRESSIONS:
            raise RouteSAEError(f"compression {layout.compression!r} not one of {COMPRESSIONS}")
        attrs = {
            "schema_version": SCHEMA_VERSION,
            **provenance,
            "layers": list(layers),
            "d_model": d_model,
            "storage_dtype": storage_dtype,
            "capacity_tokens": capacity_tokens,
            "layout": asdict(layout),
            "progress": {"tokens": 0, "complete": False, "resume": None, "stats": None},
        }
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        itemsize = np.dtype(ZARR_DTYPES[storage_dtype]).itemsize
        compressors = (
            [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=itemsize)]
            if layout.compression == "blosc-zstd"
            else None
        )
        for layer in layers:
            group.create_array(
                _act_name(layer),
                shape=(capacity_tokens, d_model),
                dtype=ZARR_DTYPES[storage_dtype],
                chunks=(layout.chunk_tokens, d_model),
                shards=(layout.shard_tokens, d_model),
                compressors=compressors,
                fill_value=0,
                dimension_names=("token", "d_model"),
            )
        for name, dtype in (("token_ids", np.int32), ("positions", np.int32), ("special", np.bool_)):
            group.create_array(
                name,
                shape=(capacity_tokens,),
                dtype=dtype,
                chunks=(layout.shard_tokens,),
                compressors=[BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)],
                fill_value=0,
                dimension_names=("token",),
            )
        # The attributes go last: a store whose creation was interrupted has no routesae attributes
        # and is recognised as debris, never as an empty harvest.
        group.attrs[ATTR_KEY] = attrs
        return cls(path, group, attrs)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "StoreWriter":
        path = Path(path)
        attrs = _read_attrs(path)
        writer = cls(path, zarr.open_group(str(path), mode="r+", zarr_format=3), attrs)
        for files in writer.files.values():  # a harvest killed mid-write left these
            if files is not None:
                files.remove_partial_writes()
        return writer

    @property
    def progress(self) -> dict[str, Any]:
        return self.attrs["progress"]

    def write_shard(
        self,
        shard_index: int,
        acts: np.ndarray,
        token_ids: np.ndarray,
        positions: np.ndarray,
        special: np.ndarray,
    ) -> None:
        """Write one shard's tokens: acts [n_layers, n, d_model] in the storage dtype's numpy type.

        Whole shards are written in one call, so zarr never read-modify-writes a shard file."""
        n = token_ids.shape[0]
        start = shard_index * self.layout.shard_tokens
        if n > self.layout.shard_tokens or start + n > self.attrs["capacity_tokens"]:
            raise ValueError(f"shard {shard_index} of {n} tokens does not fit the store")
        for i, layer in enumerate(self.layers):
            files = self.files[layer]
            if files is not None:
                files.write_shard(shard_index, np.ascontiguousarray(acts[i]))
            else:
                self.arrays[layer][start : start + n] = acts[i]
        self.token_ids[start : start + n] = token_ids
        self.positions[start : start + n] = positions
        self.special[start : start + n] = special

    def write_contexts(self, shard_index: int, acts: torch.Tensor, token_ids: np.ndarray, special: np.ndarray) -> None:
        """`write_shard` for whole contexts as the model computed them: acts [n_layers, n, d_model] a
        CPU tensor in the storage dtype (bf16 written as its bits); positions follow from the layout."""
        raw = acts.view(torch.int16).numpy().view(np.uint16) if acts.dtype == torch.bfloat16 else acts.numpy()
        ctx = int(self.attrs["context_len"])
        positions = np.tile(np.arange(ctx, dtype=np.int32), token_ids.shape[0] // ctx)
        self.write_shard(shard_index, raw, token_ids, positions, special)

    def commit(self, tokens: int, resume: dict[str, Any] | None, stats: dict[str, Any], complete: bool = False) -> None:
        """Publish the first `tokens` tokens. zarr's local store replaces zarr.json atomically,
        so a reader (or a resumed harvest) sees either the previous commit or this one."""
        progress = {"tokens": tokens, "complete": complete, "resume": resume, "stats": stats}
        self.attrs = {**self.attrs, "progress": progress}
        self.group.attrs[ATTR_KEY] = self.attrs

    def finish(self, tokens: int, stats: dict[str, Any]) -> None:
        """Shrink the arrays to what was harvested, then mark the store complete."""
        for arr in [*self.arrays.values(), self.token_ids, self.positions, self.special]:
            if arr.shape[0] != tokens:
                arr.resize((tokens, *arr.shape[1:]))
        self.commit(tokens, None, stats, complete=True)


def remove_store(path: str | os.PathLike) -> None:
    shutil.rmtree(path)


class Cache:
    """Read access to a harvested activation store.

    Tokens are numbered 0..n_tokens-1 in harvest order; only committed tokens are visible.
    Layers are Hugging Face `hidden_states` indices (0 = embeddings, i = output of block i-1)."""

    def __init__(self, path: Path, attrs: dict[str, Any]):
        self.path = path
        self.attrs = attrs
        self._group = zarr.open_group(str(path), mode="r", zarr_format=3)
        self._arrays = {layer: self._group[_act_name(layer)] for layer in attrs["layers"]}
        self.storage_dtype: str = attrs["storage_dtype"]
        self._raw = _shard_files(path, self._arrays)

    @classmethod
    def open(cls, path: str | os.PathLike, require_complete: bool = False) -> "Cache":
        path = Path(path)
        if not path.exists():
            raise RouteSAEError(f"no store at {path}")
        cache = cls(path, _read_attrs(path))
        if require_complete and not cache.complete:
            raise RouteSAEError(
                f"{path} is an unfinished harvest ({cache.n_tokens} tokens committed); "
                "rerun the same harvest command to finish it"
            )
        return cache

    # --- description ---------------------------------------------------------------------------
    @property
    def has_token_ids(self) -> bool:
        """Whether the store holds its token ids (what contexts are rebuilt from)."""
        return "token_ids" in self._group

    @property
    def harvest_batch_size(self) -> int | None:
        """Contexts per forward of the harvest that wrote the store (None: not recorded)."""
        value = self.attrs.get("batch_size")
        return int(value) if value is not None else None

    @property
    def n_tokens(self) -> int:
        return int(self.attrs["progress"]["tokens"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs["progress"]["complete"])

    @property
    def layers(self) -> list[int]:
        return list(self.attrs["layers"])

    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    @property
    def context_len(self) -> int:
        return int(self.attrs["context_len"])

    @property
    def n_model_layers(self) -> int:
        return int(self.attrs["model"]["n_layers"])

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(**self.attrs["layout"])

    @property
    def model(self) -> dict[str, Any]:
        """Model provenance: id, revision, dtype, n_layers, tokenizer."""
        return dict(self.attrs["model"])

    @property
    def fingerprint(self) -> str:
        """Identifies the model, data and settings behind the store (not the token count)."""
        keep = {k: v for k, v in self.attrs.items() if k not in ("progress", "package_version")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def routed_layers(self) -> list[int]:
        """The RouteSAE paper's routed layers, L//4 .. 3L//4, that this store holds."""
        n = self.n_model_layers
        return [layer for layer in range(n // 4, 3 * n // 4 + 1) if layer in self.attrs["layers"]]

    def default_layer(self) -> int:
        """The 3/4-depth layer the single-layer baseline uses."""
        return 3 * self.n_model_layers // 4

    def stats(self, layer: int) -> LayerStats:
        """Statistics of `layer` over the committed non-special tokens."""
        self._check_layer(layer)
        s = self.attrs["progress"]["stats"]
        if not s or not s["count"]:
            raise RouteSAEError(f"{self.path} has no statistics yet (no committed non-special token)")
        i = self.layers.index(layer)
        n = s["count"]
        mean = torch.tensor(s["sum"][i], dtype=torch.float64) / n
        return LayerStats(n, mean.float(), s["sum_sq_norm"][i] / n, s["sum_norm"][i] / n)

    # --- data ------------------------------------------------------------------------------------
    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.n_tokens:
            raise RouteSAEError(f"token range [{start}, {stop}) outside the store's {self.n_tokens} tokens")

    def _check_layer(self, layer: int) -> None:
        if layer not in self._arrays:
            raise RouteSAEError(f"layer {layer} is not in the store (it holds {self.layers})")

    def _read_zarr(self, name: str, start: int, stop: int, read: Callable[[zarr.Array], _T]) -> _T:
        """read(array) for tokens [start, stop) of array `name`, with damage reported in one line
        naming the file: zarr fills a missing file with the fill value without a word, and a
        truncated or corrupt one fails deep inside a codec with a message that names no file."""
        array = self._group[name]
        rows = shard_rows(array)
        for shard in range(start // rows, -(-stop // rows)):
            path = shard_path(self.path / name, array, shard)
            if not path.is_file():
                raise RouteSAEError(f"{path}: missing file of {name} (tokens {shard * rows:,}..); {VERIFY_HINT}")
        try:
            return read(array)
        except Exception as e:
            raise self._locate_damage(name, array, start, stop, e) from None

    def _locate_damage(self, name: str, array: zarr.Array, start: int, stop: int, error: Exception) -> RouteSAEError:
        """The error for a failed read of [start, stop): names the first file that fails alone."""
        rows = shard_rows(array)
        for shard in range(start // rows, -(-stop // rows)):
            a, b = max(start, shard * rows), min(stop, (shard + 1) * rows)
            try:
                array[a:b]
            except Exception as e:
                path = shard_path(self.path / name, array, shard)
                return RouteSAEError(f"{path}: damaged file of {name} ({first_line(e)}); {VERIFY_HINT}")
        return RouteSAEError(f"{self.path / name}: cannot read tokens {start:,}..{stop:,} ({first_line(error)})")

    def _token_array(self, name: str, start: int, stop: int | None) -> np.ndarray:
        stop = self.n_tokens if stop is None else stop
        self._check_range(start, stop)
        return self._read_zarr(name, start, stop, lambda array: array[start:stop])

    def token_ids(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return torch.from_numpy(self._token_array("token_ids", start, stop).astype(np.int64))

    def positions(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return torch.from_numpy(self._token_array("positions", start, stop).astype(np.int64))

    def special(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """True where the token is BOS, EOS or pad."""
        return torch.from_numpy(self._token_array("special", start, stop))

    def acts_stored(self, layer: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Activations in the storage dtype (bf16 for a bf16 model), [stop-start, d_model].

        With `out` (a contiguous CPU tensor of that shape and dtype) they are read into it and it
        is returned: no other copy is made."""
        self._check_layer(layer)
        self._check_range(start, stop)
        if out is None:
            out = torch.empty((stop - start, self.d_model), dtype=TORCH_DTYPES[self.storage_dtype])
        bits = self._bits_of(out, stop - start)
        raw = self._raw[layer]
        if raw is not None:
            raw.read_into(start, stop, bits)
        else:
            self._read_zarr(_act_name(layer), start, stop, lambda array: array.get_basic_selection(
                slice(start, stop), out=NDBuffer.from_numpy_array(bits)))
        return out

    def shard_files(self, layer: int) -> ShardFiles | None:
        """Direct access to a layer's shard files, where it is stored uncompressed (else None)."""
        self._check_layer(layer)
        return self._raw[layer]

    def acts_scattered(self, layer: int, start: int, stop: int, out: torch.Tensor, dest: torch.Tensor) -> None:
        """Token start+i's activations into out[dest[i]], for tokens [start, stop): a read and a
        row shuffle in one copy (uncompressed stores on Linux; otherwise a read, then a copy).

        out: contiguous CPU tensor [R, d_model] in the storage dtype; dest: int64 [stop-start] in [0, R)."""
        self._check_layer(layer)
        self._check_range(start, stop)
        bits = self._bits_of(out)
        raw = self._raw[layer]
        if raw is not None and raw.scatter_into(start, stop, bits, dest.numpy()):
            return
        rows = torch.from_numpy(check_row_indices(dest.numpy(), stop - start, out.shape[0]))
        out.index_copy_(0, rows, self.acts_stored(layer, start, stop))

    def _bits_of(self, out: torch.Tensor, rows: int | None = None) -> np.ndarray:
        """A numpy view of `out` (bf16 as its uint16 bits) after checking it is a contiguous CPU
        tensor [rows (any if None), d_model] in the storage dtype."""
        dtype = TORCH_DTYPES[self.storage_dtype]
        ok_rows = rows is None or out.shape[0] == rows
        if out.dim() != 2 or not ok_rows or out.shape[1] != self.d_model or out.dtype != dtype \
                or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"out must be a contiguous CPU {dtype} tensor of shape [{'rows' if rows is None else rows}, {self.d_model}]")
        return (out.view(torch.uint16) if dtype == torch.bfloat16 else out).numpy()

    def acts(self, layer: int, start: int, stop: int) -> torch.Tensor:
        """Activations as float32, [stop-start, d_model]."""
        return self.acts_stored(layer, start, stop).float()

    # --- disk ------------------------------------------------------------------------------------
    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def nbytes_raw_acts(self) -> int:
        """What the committed activations would take uncompressed in the storage dtype."""
        itemsize = np.dtype(ZARR_DTYPES[self.storage_dtype]).itemsize
        return self.n_tokens * len(self.layers) * self.d_model * itemsize

    def nbytes_acts_on_disk(self) -> int:
        return sum(f.stat().st_size for f in (self.path / "acts").rglob("*") if f.is_file() and f.name != "zarr.json")

    def __repr__(self) -> str:
        return (
            f"Cache({str(self.path)!r}, model={self.model.get('id')!r}, layers={self.layers}, "
            f"n_tokens={self.n_tokens}, d_model={self.d_model}, complete={self.complete})"
        )
