"""The activation store: a Zarr v3 group laid out as cache_schema.md fixes.

`StoreWriter` is the only code that writes a store; `Cache` is what every later stage reads.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar

import numpy as np
import torch
import zarr
from zarr.core.buffer.cpu import NDBuffer
from zarr.codecs import BloscCodec

from routesae.errors import RouteSAEError
from routesae.store.int8 import dequantize
from routesae.store.location import RemotePath, StorePath, file_sizes, remove_tree, store_path, zarr_store
from routesae.store.shard_files import VERIFY_HINT, ShardFiles, check_row_indices

WRITE_THREADS = 4
"""Layers' shard files written at once (uncompressed local stores): each write is a copy into the
page cache that releases the GIL, and one thread copies at about 1.5-1.7 GB/s (bench/big_store.py's
write-ram phase: 1.5-1.7 GB/s one layer after another, 2.2-2.5 GB/s four at once on 2 cores), less
than a GPU harvest of a 1B model produces and less than an NVMe disk takes."""

SCHEMA_VERSION = 1
# int8 stores (cache_schema.md, "8-bit storage") are version 2: a reader of version 1 would take
# their int8 values for activations. Every other store is still written as version 1.
INT8_SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
ATTR_KEY = "routesae"
# Storage dtypes by name; bfloat16 has no Zarr v3 core type, so its bits live in uint16.
ZARR_DTYPES = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMPRESSIONS = ("none", "blosc-zstd")
STORAGES = ("model", "int8")
SPECIAL_CHUNK_ROWS = 64  # rows per inner chunk of special_acts/<layer>: a shard's special rows fill a few


def special_chunk_rows(layout: "StoreLayout") -> int:
    """Rows per inner chunk of special_acts/<layer>: 64, or fewer where the shard's rows are not a
    multiple of 64 (zarr's shards hold whole inner chunks; contexts of e.g. 32 tokens in batches
    of 5 make shards of 480)."""
    return math.gcd(SPECIAL_CHUNK_ROWS, layout.shard_tokens)

TOKEN_ARRAYS = ("token_ids", "positions", "special")
# Per-shard records (cache_schema.md, "Several writers"): each shard's statistics and packer state,
# written by the shard's writer; `record` is written last and is the shard's own commit.
SHARD_PROGRESS = "shard_progress"
RECORD_FIELDS = ("tokens_after", "count", "resume_doc", "resume_offset")
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
    storage: str = "model"
    """Activations in the model's dtype ('model'), or 'int8' with a per-token scale (store/int8.py)."""


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
    storage: str = "model",
) -> StoreLayout:
    """Pick chunk and shard sizes: chunks of whole contexts and at least ~1 MiB; shards of whole
    chunks and whole forward batches (so a resumed harvest replays identical batches), about
    shard_bytes over all layers, since the harvest holds a few shards in RAM."""
    chunk_contexts = max(1, math.ceil(min_chunk_bytes / (context_len * d_model * itemsize)))
    step = math.lcm(chunk_contexts, batch_contexts)
    if shard_tokens is None:
        shard_tokens = shard_bytes // (n_layers * d_model * itemsize)
    shard_contexts = step * max(1, round(shard_tokens / (step * context_len)))
    return StoreLayout(chunk_contexts * context_len, shard_contexts * context_len, compression, storage)


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
        forward) and read back once (one wait for a GPU); batches accumulate in float64."""
        w = keep.to(acts.device, torch.float32)
        self.count += int(keep.sum())
        rows = []
        for i in range(len(self.layers)):  # one layer at a time bounds the float32 copy
            x = acts[i].float()
            sq = x.pow(2).sum(-1)
            rows.append(torch.cat([w @ x, (w @ sq).view(1), (w @ sq.sqrt()).view(1)]))
        sums = torch.stack(rows).double().cpu().numpy()  # [n_layers, d_model + 2], as `packed` lays them out
        self.merge(0, sums)

    def merge(self, count: int, sums: np.ndarray) -> None:
        """Add one shard's sums: sums [n_layers, d_model + 2] is (sum | sum_sq_norm | sum_norm)."""
        self.count += int(count)
        self.sum += sums[:, :-2]
        self.sum_sq_norm += sums[:, -2]
        self.sum_norm += sums[:, -1]

    def packed(self) -> np.ndarray:
        """The sums as one [n_layers, d_model + 2] float64 array, the layout `merge` reads."""
        return np.concatenate([self.sum, self.sum_sq_norm[:, None], self.sum_norm[:, None]], axis=1)

    def state(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "sum_sq_norm": self.sum_sq_norm.tolist(),
            "sum_norm": self.sum_norm.tolist(),
        }


def _read_attrs(path: StorePath) -> dict[str, Any]:
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
    if attrs.get("schema_version") not in READABLE_VERSIONS:
        raise RouteSAEError(
            f"{path} has schema version {attrs.get('schema_version')}; this routesae reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    return attrs


def _act_name(layer: int) -> str:
    return f"acts/{layer}"


def shard_rows(array: zarr.Array) -> int:
    """Tokens per file of a [tokens, ...] array: its shard length, or its chunk length if unsharded."""
    return int((array.shards or array.chunks)[0])


def shard_path(array_dir: StorePath, array: zarr.Array, shard: int) -> Path:
    """The file holding shard (or chunk) `shard` of a [tokens, ...] array: zarr's default chunk keys."""
    return array_dir / "c" / "/".join([str(shard), *("0" for _ in array.shape[1:])])


def first_line(e: BaseException) -> str:
    """An exception's first sentence (codecs append the stored and computed bytes to theirs)."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(e).__name__


def _bits(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as the numpy array a store holds (bf16 as its uint16 bits)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def tensor_of_bits(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """What a store holds as a tensor of its values' dtype (bf16 from its uint16 bits); the inverse of _bits."""
    return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(raw)


def value_attributes(storage_dtype: str, layer: int, int8: bool = False) -> dict[str, Any]:
    """What an activation array says about its values, for readers that know nothing of routesae."""
    attrs: dict[str, Any] = {"layer": layer, "value_dtype": storage_dtype}
    if int8:
        attrs["encoding"] = (f"int8: value = q * scales/{layer}[token] (float32); special tokens' exact rows are in "
                             f"special_acts/{layer} (cache_schema.md, '8-bit storage')")
    elif storage_dtype == "bfloat16":
        attrs["encoding"] = ("raw bfloat16 bits in uint16: reinterpret, do not convert "
                             "(numpy: a.view(ml_dtypes.bfloat16))")
    return attrs


def _create_shard_progress(group: zarr.Group, n_shards: int, n_layers: int, d_model: int) -> None:
    """The per-shard records: one chunk per shard, so each is written by that shard's writer only."""
    progress = group.require_group(SHARD_PROGRESS)
    progress.create_array("stats", shape=(n_shards, n_layers, d_model + 2), dtype=np.float64,
                          chunks=(1, n_layers, d_model + 2), compressors=None, fill_value=0.0,
                          dimension_names=("shard", "layer", "sum_sq_norm_norm"))
    progress.create_array("record", shape=(n_shards, len(RECORD_FIELDS)), dtype=np.int64,
                          chunks=(1, len(RECORD_FIELDS)), compressors=None, fill_value=-1,
                          dimension_names=("shard", "field"))
    progress["record"].attrs["fields"] = list(RECORD_FIELDS)


def _shard_files(path: StorePath, arrays: dict[int, zarr.Array]) -> dict[int, ShardFiles | None]:
    """Per layer, direct access to its shard files when stored uncompressed on a local disk
    (shard_files.py says why); remote stores go through zarr, which fetches whole chunks."""
    if not isinstance(path, Path):
        return {layer: None for layer in arrays}
    return {layer: ShardFiles.for_array(arr, path / _act_name(layer)) for layer, arr in arrays.items()}


class StoreWriter:
    """Writes shards of a store and commits them; one writer per shard, ever."""

    def __init__(self, path: StorePath, group: zarr.Group, attrs: dict[str, Any]):
        self.path = path
        self.group = group
        self.attrs = attrs
        self.layers: list[int] = attrs["layers"]
        self.layout = StoreLayout(**attrs["layout"])
        self.arrays = {layer: group[_act_name(layer)] for layer in self.layers}
        self.files = _shard_files(path, self.arrays)
        self.int8 = self.layout.storage == "int8"
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
        path = store_path(path)
        if storage_dtype not in ZARR_DTYPES:
            raise RouteSAEError(f"storage dtype {storage_dtype!r} not supported: {sorted(ZARR_DTYPES)}")
        if layout.compression not in COMPRESSIONS:
            raise RouteSAEError(f"compression {layout.compression!r} not one of {COMPRESSIONS}")
        if layout.storage not in STORAGES:
            raise RouteSAEError(f"storage {layout.storage!r} not one of {STORAGES}")
        int8 = layout.storage == "int8"
        attrs = {
            "schema_version": INT8_SCHEMA_VERSION if int8 else SCHEMA_VERSION,
            **provenance,
            "layers": list(layers),
            "d_model": d_model,
            "storage_dtype": "int8" if int8 else storage_dtype,
            **({"value_dtype": storage_dtype} if int8 else {}),
            "capacity_tokens": capacity_tokens,
            "layout": asdict(layout),
            "progress": {"tokens": 0, "complete": False, "resume": None, "stats": None},
        }
        group = zarr.open_group(zarr_store(path), mode="w", zarr_format=3)
        itemsize = 1 if int8 else np.dtype(ZARR_DTYPES[storage_dtype]).itemsize
        compressors = (
            [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=itemsize)]
            if layout.compression == "blosc-zstd"
            else None
        )
        for layer in layers:
            group.create_array(
                _act_name(layer),
                shape=(capacity_tokens, d_model),
                dtype=np.int8 if int8 else ZARR_DTYPES[storage_dtype],
                chunks=(layout.chunk_tokens, d_model),
                shards=(layout.shard_tokens, d_model),
                compressors=compressors,
                fill_value=0,
                dimension_names=("token", "d_model"),
                attributes=value_attributes(storage_dtype, layer, int8),
            )
            if int8:
                group.create_array(f"scales/{layer}", shape=(capacity_tokens,), dtype=np.float32,
                                   chunks=(layout.shard_tokens,), fill_value=0.0, dimension_names=("token",),
                                   compressors=[BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4)])
                group.create_array(f"special_acts/{layer}", shape=(capacity_tokens, d_model),
                                   dtype=ZARR_DTYPES[storage_dtype], chunks=(special_chunk_rows(layout), d_model),
                                   shards=(layout.shard_tokens, d_model), compressors=None, fill_value=0,
                                   dimension_names=("special_row", "d_model"),
                                   attributes={"layer": layer, "value_dtype": storage_dtype, "encoding": (
                                       "row s * shard_tokens + j holds the j-th special token of shard s, exact")})
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
        _create_shard_progress(group, -(-capacity_tokens // layout.shard_tokens), len(layers), d_model)
        # The attributes go last: a store whose creation was interrupted has no routesae attributes
        # and is recognised as debris, never as an empty harvest.
        group.attrs[ATTR_KEY] = attrs
        return cls(path, group, attrs)

    @classmethod
    def open(cls, path: str | os.PathLike, owns: Callable[[int], bool] = lambda shard: True) -> "StoreWriter":
        """Open a store to write more of it. `owns(shard)` says which shards this writer writes:
        only their leftovers of a killed write are removed (another writer may be mid-write)."""
        path = store_path(path)
        attrs = _read_attrs(path)
        group = zarr.open_group(zarr_store(path), mode="r+", zarr_format=3)
        if SHARD_PROGRESS not in group:  # a store begun before the per-shard records existed
            layout = StoreLayout(**attrs["layout"])
            _create_shard_progress(group, -(-attrs["capacity_tokens"] // layout.shard_tokens),
                                   len(attrs["layers"]), attrs["d_model"])
        writer = cls(path, group, attrs)
        for files in writer.files.values():  # a harvest killed mid-write left these
            if files is not None:
                files.remove_partial_writes(owns)
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
        scales: np.ndarray | None = None,
        special_rows: np.ndarray | None = None,
    ) -> None:
        """Write one shard's tokens: acts [n_layers, n, d_model] in the storage dtype's numpy type.
        int8 stores also take scales [n_layers, n] float32 and the special tokens' exact rows,
        special_rows [n_layers, n_special, d_model] in the value dtype's numpy type.

        Whole shards are written in one call, so zarr never read-modify-writes a shard file."""
        n = token_ids.shape[0]
        start = shard_index * self.layout.shard_tokens
        if n > self.layout.shard_tokens or start + n > self.attrs["capacity_tokens"]:
            raise ValueError(f"shard {shard_index} of {n} tokens does not fit the store")
        if self.int8 and (scales is None or special_rows is None or special_rows.shape[1] != int(special.sum())):
            raise ValueError("an int8 store's shard needs its scales and one exact row per special token")
        direct = [(i, self.files[layer]) for i, layer in enumerate(self.layers) if self.files[layer] is not None]
        if direct:
            with ThreadPoolExecutor(min(WRITE_THREADS, len(direct))) as pool:
                # each layer's file appears whole or not at all; the shard's record comes later
                list(pool.map(lambda job: job[1].write_shard(shard_index, np.ascontiguousarray(acts[job[0]])), direct))
        for i, layer in enumerate(self.layers):
            if self.files[layer] is None:
                self.arrays[layer][start : start + n] = acts[i]
            if self.int8:
                self.group[f"scales/{layer}"][start : start + n] = scales[i]
                if special_rows.shape[1]:
                    self.group[f"special_acts/{layer}"][start : start + special_rows.shape[1]] = special_rows[i]
        self.token_ids[start : start + n] = token_ids
        self.positions[start : start + n] = positions
        self.special[start : start + n] = special

    def write_contexts(self, shard_index: int, acts: torch.Tensor, token_ids: np.ndarray, special: np.ndarray,
                       quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`write_shard` for whole contexts as the model computed them: acts [n_layers, n, d_model] a
        CPU tensor in the model's dtype (bf16 written as its bits); positions follow from the layout.
        int8 stores also take `quantized` = (q int8 [n_layers, n, d_model], scales [n_layers, n]);
        their special rows are taken, exact, from `acts`."""
        ctx = int(self.attrs["context_len"])
        positions = np.tile(np.arange(ctx, dtype=np.int32), token_ids.shape[0] // ctx)
        if not self.int8:
            self.write_shard(shard_index, _bits(acts), token_ids, positions, special)
            return
        if quantized is None:
            raise ValueError("an int8 store is written from quantized activations (store/int8.py)")
        q, scales = quantized
        rows = _bits(acts[:, torch.from_numpy(special)].contiguous())
        self.write_shard(shard_index, q.numpy(), token_ids, positions, special, scales.numpy(), rows)

    def record_shard(self, shard_index: int, tokens_after: int, resume: dict[str, int], count: int,
                     sums: np.ndarray) -> None:
        """A written shard's own commit: its statistics, then its record (the record last, so a
        shard that has one is whole). Only the shard's writer calls this."""
        progress = self.group[SHARD_PROGRESS]
        progress["stats"][shard_index] = sums
        progress["record"][shard_index] = [tokens_after, count, resume["doc"], resume["offset"]]

    def recorded_shards(self, start: int = 0) -> set[int]:
        """Shards from `start` on whose writers have recorded them (written whole)."""
        record = self.group[SHARD_PROGRESS]["record"]
        if start >= record.shape[0]:
            return set()
        tokens_after = record[start:, 0]
        return {start + int(i) for i in np.flatnonzero(tokens_after >= 0)}

    def advance(self, window: int = 64) -> bool:
        """Commit every recorded shard that extends the committed prefix (the committer's job: one
        process only). Statistics are folded shard by shard in order, so the result does not depend
        on how many writers wrote the shards. True if the prefix grew."""
        progress = self.group[SHARD_PROGRESS]
        record, stats_array = progress["record"], progress["stats"]
        shard = -(-self.progress["tokens"] // self.layout.shard_tokens)
        acc = StatsAccumulator(self.layers, self.attrs["d_model"], self.progress["stats"])
        last = None
        while shard < record.shape[0]:
            rows = record[shard : shard + window]
            present = rows[:, 0] >= 0
            n = len(rows) if present.all() else int(np.argmin(present))
            if n:
                sums = stats_array[shard : shard + n]
                for i in range(n):
                    acc.merge(int(rows[i, 1]), sums[i])
                last = rows[n - 1]
            shard += n
            if n < len(rows):
                break
        if last is None:
            return False
        self.commit(int(last[0]), {"doc": int(last[2]), "offset": int(last[3])}, acc.state())
        return True

    def commit(self, tokens: int, resume: dict[str, Any] | None, stats: dict[str, Any], complete: bool = False) -> None:
        """Publish the first `tokens` tokens. zarr's local store replaces zarr.json atomically,
        so a reader (or a resumed harvest) sees either the previous commit or this one."""
        progress = {"tokens": tokens, "complete": complete, "resume": resume, "stats": stats}
        self.attrs = {**self.attrs, "progress": progress}
        self.group.attrs[ATTR_KEY] = self.attrs

    def finish(self, tokens: int, stats: dict[str, Any]) -> None:
        """Shrink the arrays to what was harvested, mark the store complete, then write zarr's
        consolidated metadata (one read opens the whole store, for xarray and the like)."""
        for arr in [*self.arrays.values(), self.token_ids, self.positions, self.special]:
            if arr.shape[0] != tokens:
                arr.resize((tokens, *arr.shape[1:]))
        if SHARD_PROGRESS in self.group:
            shards = -(-tokens // self.layout.shard_tokens)
            for arr in self.group[SHARD_PROGRESS].array_values():
                if arr.shape[0] != shards:
                    arr.resize((shards, *arr.shape[1:]))
        self.commit(tokens, None, stats, complete=True)
        with warnings.catch_warnings():  # zarr notes that v3's spec does not cover it yet: xarray reads it
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(zarr_store(self.path), zarr_format=3)


def remove_store(path: str | os.PathLike) -> None:
    remove_tree(store_path(path))


class Cache:
    """Read access to a harvested activation store.

    Tokens are numbered 0..n_tokens-1 in harvest order; only committed tokens are visible.
    Layers are Hugging Face `hidden_states` indices (0 = embeddings, i = output of block i-1)."""

    def __init__(self, path: StorePath, attrs: dict[str, Any]):
        self.path = path
        self.attrs = attrs
        self._group = zarr.open_group(zarr_store(path, read_only=True), mode="r", zarr_format=3)
        self._present: set[tuple[str, int]] = set()  # shard files seen to exist
        self._side: OrderedDict[tuple[int, int], Any] = OrderedDict()  # int8 stores: see _int8_side
        self._specials: OrderedDict[int, np.ndarray] = OrderedDict()  # int8 stores: see _special_positions
        self._arrays = {layer: self._group[_act_name(layer)] for layer in attrs["layers"]}
        self.quantized: bool = attrs["storage_dtype"] == "int8"
        """int8 storage: reads dequantize, so they are close to, not equal to, what the model computed."""
        self.storage_dtype: str = attrs.get("value_dtype", attrs["storage_dtype"])
        """The dtype reads give (acts_stored): the model's; for an int8 store what it dequantizes to."""
        self._raw = _shard_files(path, self._arrays)

    @classmethod
    def open(cls, path: str | os.PathLike, require_complete: bool = False) -> "Cache":
        """Open the store at a local path or a URL (`s3://bucket/store.zarr`)."""
        path = store_path(path)
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
        """Whether the store holds its token ids (what contexts are rebuilt from). Asked of the
        array's own metadata object: consolidated metadata would still list a removed array."""
        return "token_ids" in self._group and (self.path / "token_ids" / "zarr.json").is_file()

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
    def remote(self) -> bool:
        """Whether the store lives on object storage (s3://, ...) rather than a local folder."""
        return isinstance(self.path, RemotePath)

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
            if (name, shard) in self._present:
                continue
            path = shard_path(self.path / name, array, shard)
            if not path.is_file():
                raise RouteSAEError(f"{path}: missing file of {name} (tokens {shard * rows:,}..); {VERIFY_HINT}")
            self._present.add((name, shard))
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
        if self.quantized:
            self._dequantized_into(layer, start, stop, out)
        else:
            self._rows_into(layer, start, stop, bits)
        return out

    def _rows_into(self, layer: int, start: int, stop: int, dest: np.ndarray) -> None:
        """The stored rows [start, stop) of acts/<layer>, as they are on disk, into dest."""
        raw = self._raw[layer]
        if raw is not None:
            raw.read_into(start, stop, dest)
        else:
            self._read_zarr(_act_name(layer), start, stop, lambda array: array.get_basic_selection(
                slice(start, stop), out=NDBuffer.from_numpy_array(dest)))

    def _dequantized_into(self, layer: int, start: int, stop: int, out: torch.Tensor) -> None:
        """An int8 store's rows [start, stop) as q * scale in the value dtype, special rows exact."""
        q = np.empty((stop - start, self.d_model), dtype=np.int8)
        self._rows_into(layer, start, stop, q)
        rows = self.layout.shard_tokens
        for shard in range(start // rows, -(-stop // rows)):
            a, b = max(start, shard * rows), min(stop, (shard + 1) * rows)
            scales, where, exact = self._int8_side(layer, shard)
            lo, hi = a - shard * rows, b - shard * rows
            dequantize(torch.from_numpy(q[a - start : b - start]), scales[lo:hi], out.dtype, out=out[a - start : b - start])
            pick = (where >= lo) & (where < hi)  # the shard's special tokens in [a, b), in order
            if pick.any():
                out[torch.from_numpy(where[pick] - lo + (a - start))] = exact[torch.from_numpy(pick)]

    def _int8_side(self, layer: int, shard: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """A shard's scales, the in-shard positions of its special tokens and their exact rows: read
        once per shard and kept for the next reads (a few hundred KB per shard of all layers)."""
        key = (layer, shard)
        hit = self._side.get(key)
        if hit is not None:
            self._side.move_to_end(key)
            return hit
        rows = self.layout.shard_tokens
        a, b = shard * rows, min(self.n_tokens, (shard + 1) * rows)
        scales = torch.from_numpy(self._read_zarr(f"scales/{layer}", a, b, lambda array: array[a:b]))
        where = self._special_positions(shard)
        name, n = f"special_acts/{layer}", where.size
        exact = self._read_zarr(name, a, a + n, lambda array: array[a : a + n]) if n else \
            np.zeros((0, self.d_model), dtype=ZARR_DTYPES[self.storage_dtype])
        self._side[key] = (scales, where, tensor_of_bits(exact, self.storage_dtype))
        if len(self._side) > 64 * len(self.layers):
            self._side.popitem(last=False)
        return self._side[key]

    def _special_positions(self, shard: int) -> np.ndarray:
        """In-shard positions of a shard's special tokens: read once for all its layers."""
        hit = self._specials.get(shard)
        if hit is None:
            rows = self.layout.shard_tokens
            hit = np.flatnonzero(self._token_array("special", shard * rows, min(self.n_tokens, (shard + 1) * rows)))
            self._specials[shard] = hit
            if len(self._specials) > 64:
                self._specials.popitem(last=False)
        return hit

    def shard_files(self, layer: int) -> ShardFiles | None:
        """Direct access to a layer's shard files, where its rows are stored uncompressed in the
        value dtype (else None: compressed, remote or int8 stores)."""
        self._check_layer(layer)
        return None if self.quantized else self._raw[layer]

    def acts_scattered(self, layer: int, start: int, stop: int, out: torch.Tensor, dest: torch.Tensor) -> None:
        """Token start+i's activations into out[dest[i]], for tokens [start, stop): a read and a
        row shuffle in one copy (uncompressed stores on Linux; otherwise a read, then a copy).

        out: contiguous CPU tensor [R, d_model] in the storage dtype; dest: int64 [stop-start] in [0, R)."""
        self._check_layer(layer)
        self._check_range(start, stop)
        bits = self._bits_of(out)
        raw = None if self.quantized else self._raw[layer]
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
        return sum(size for _, size in file_sizes(self.path))

    def bytes_per_token_per_layer(self) -> float:
        """Uncompressed bytes of one token of one layer: d_model values (int8: plus its float32 scale)."""
        if self.quantized:
            return self.d_model + 4
        return self.d_model * np.dtype(ZARR_DTYPES[self.storage_dtype]).itemsize

    def nbytes_raw_acts(self) -> int:
        """What the committed activations would take uncompressed in the storage dtype."""
        return int(self.n_tokens * len(self.layers) * self.bytes_per_token_per_layer())

    def nbytes_acts_on_disk(self) -> int:
        """Bytes of the activations' files (int8 stores: with their scales and exact special rows)."""
        folders = ["acts", "scales", "special_acts"] if self.quantized else ["acts"]
        return sum(size for folder in folders for name, size in file_sizes(self.path / folder)
                   if not name.endswith("zarr.json"))

    def __repr__(self) -> str:
        return (
            f"Cache({str(self.path)!r}, model={self.model.get('id')!r}, layers={self.layers}, "
            f"n_tokens={self.n_tokens}, d_model={self.d_model}, complete={self.complete})"
        )
