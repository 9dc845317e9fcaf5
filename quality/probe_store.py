"""Harvest once, probe many: labelled prompt sets go through the model once into a labelled store,
the residual at each prompt's last token for every requested layer, beside its label, dataset and
split. Every SAE, present or future, is then probed from the store without running the LLM again.

One prompt per context, never packed with another: BOS first, then the prompt's tokens (no other
special token added), cut from the left to `max_len` tokens (BOS kept), as the benchmark reads the
last-token residual of at most 1,024 tokens. The read position is the context's last token that
is not a special id (the last token where the prompt has none: an empty prompt reads BOS).

Prompts of one forward are right-padded to the longest of them; the model is causal, so the padding
comes after every position read and changes nothing there (no attention mask is needed). Prompts
are sorted by length first, so a batch pads little. The forward runs in the compute dtype of
model/compute_dtype.py (the storage dtype where the device multiplies it natively, else float32)
and stops after the deepest requested layer, as a harvest does; values are rounded to the storage
dtype. Layout and attributes: cache_schema.md, "Labelled stores".
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from routesae import __version__
from routesae.atomic_files import atomic_directory
from routesae.errors import RouteSAEError
from routesae.harvest.choices import DEFAULT_MODEL
from routesae.quality.probe_data import DEFAULT_SEED, ProbeDataset, load_dataset, split

ATTR_KEY = "routesae_labelled"
"""The root attribute holding a labelled store's metadata (a token store's is 'routesae', so
neither reader takes the other's store)."""
SCHEMA_VERSION = 1
SPLITS = ("train", "test")
"""Values of the `split` array: 0 train, 1 test."""
ROW_CHUNK = 4096
"""Rows per chunk of every array."""


@dataclass
class LabelledHarvestConfig:
    """What `routesae probe-data` takes."""

    out: str
    """Folder of the labelled store to write."""
    datasets: list[str] = field(default_factory=list)
    """sae-probes dataset names or .csv/.jsonl files of prompt, target."""
    model: str = DEFAULT_MODEL
    """Hub id, local folder, .gguf file, or 'smollm2' (offline)."""
    layers: str = "middle"
    """hidden_states indices: 'middle' (L//4..3L//4), 'all', '4-12' or '4,8,12'."""
    max_len: int = 1024
    """Tokens per prompt at most, BOS included; longer prompts lose their start."""
    batch_size: int = 32
    """Prompts per forward at most (short prompts: the forward's fixed cost is shared by more)."""
    batch_tokens: int = 8192
    """Padded tokens per forward at most (long prompts go in smaller batches)."""
    dtype: str = "bfloat16"
    """Storage dtype of the residuals."""
    compute_dtype: str = "auto"
    """The forward's dtype: 'auto' (model/compute_dtype.py) or a dtype name."""
    device: str = "auto"
    """'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ..."""
    seed: int = DEFAULT_SEED
    """Seed of the train/test splits."""
    max_train: int | None = None
    """Cap on each dataset's training split (the benchmark's: 1,024)."""
    max_test: int | None = None
    """Cap on each dataset's test split (default: all the rest, balanced)."""
    overwrite: bool = False
    """Replace an existing labelled store at `out`."""
    progress: bool = True
    """Show progress bars."""


class LabelledStore:
    """A labelled store, read whole into memory but for its residuals (read per layer and rows)."""

    def __init__(self, path: Path, attrs: dict[str, Any], group: Any):
        self.path = path
        self.attrs = attrs
        self.group = group
        self.model: dict[str, Any] = attrs["model"]
        """The model's provenance, as a token store records it (SAEs are checked against it)."""
        self.layers: list[int] = list(attrs["layers"])
        self.d_model: int = int(attrs["d_model"])
        self.storage_dtype: str = attrs["storage_dtype"]
        self.datasets: list[dict[str, Any]] = attrs["datasets"]
        self.labels = np.asarray(group["labels"][:], dtype=np.int8)
        self.dataset = np.asarray(group["dataset"][:], dtype=np.int64)
        self.split = np.asarray(group["split"][:], dtype=np.int8)
        self.position = np.asarray(group["position"][:], dtype=np.int64)

    @classmethod
    def open(cls, path: str | Path) -> "LabelledStore":
        import json

        import zarr

        path = Path(path)
        meta = path / "zarr.json"
        if not meta.is_file():
            raise RouteSAEError(f"no labelled store at {path} (no zarr.json); write one with `routesae probe-data`")
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError) as e:
            raise RouteSAEError(f"{path}: unreadable store metadata ({e})") from None
        if ATTR_KEY not in attrs:
            what = "an activation store" if "routesae" in attrs else "a Zarr store"
            raise RouteSAEError(f"{path} is {what}, not a labelled store; write one with `routesae probe-data`")
        attrs = attrs[ATTR_KEY]
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise RouteSAEError(f"{path} is a labelled store of schema version {attrs.get('schema_version')}; "
                                f"this routesae reads {SCHEMA_VERSION}")
        return cls(path, attrs, zarr.open_group(str(path), mode="r", zarr_format=3))

    @property
    def n_prompts(self) -> int:
        return len(self.labels)

    def rows(self, dataset: int, which: str) -> np.ndarray:
        """Row indices of one dataset's 'train' or 'test' split, in stored order."""
        return np.flatnonzero((self.dataset == dataset) & (self.split == SPLITS.index(which)))

    def acts(self, layer: int, rows: np.ndarray) -> torch.Tensor:
        """float32 [len(rows), d_model]: the stored last-token residuals of `layer` at `rows` (ascending)."""
        from routesae.store.zarr_store import tensor_of_bits

        if layer not in self.layers:
            raise RouteSAEError(f"{self.path} holds no layer {layer} (it holds {self.layers})")
        if len(rows) == 0:
            return torch.zeros(0, self.d_model)
        array = self.group[f"acts/{layer}"]
        lo, hi = int(rows.min()), int(rows.max()) + 1  # one dataset's rows are one contiguous block
        raw = np.asarray(array[lo:hi])[rows - lo]
        return tensor_of_bits(np.ascontiguousarray(raw), self.storage_dtype).float()


def context_ids(body: list[int], bos: int, max_len: int) -> list[int]:
    """BOS, then the prompt's tokens cut from the left so that the context holds max_len at most."""
    return [bos, *body[len(body) - (max_len - 1):]] if len(body) > max_len - 1 else [bos, *body]


def read_position(ids: list[int], flagged: frozenset[int]) -> int:
    """The context's last position that holds no special id (0, BOS, where every token is special)."""
    for i in range(len(ids) - 1, 0, -1):
        if ids[i] not in flagged:
            return i
    return len(ids) - 1 if ids[-1] not in flagged else 0


def batches(lengths: np.ndarray, batch_size: int, batch_tokens: int) -> list[np.ndarray]:
    """Prompt indices in forward batches: longest first, at most batch_size prompts and (but for a
    single long prompt) batch_tokens padded tokens each."""
    order = np.argsort(-lengths, kind="stable")
    out: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        fit = max(1, min(batch_size, batch_tokens // max(longest, 1)))
        out.append(order[start:start + fit])
        start += fit
    return out


def _check_out(cfg: LabelledHarvestConfig) -> Path:
    out = Path(cfg.out)
    if out.is_file():
        raise RouteSAEError(f"{out} is a file, not a store folder")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise RouteSAEError(f"{out} exists; pass --overwrite to replace it")
        attrs = {}
        try:
            import json

            attrs = json.loads((out / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            pass
        if ATTR_KEY not in attrs:
            raise RouteSAEError(f"{out} exists and is not a labelled store; refusing to replace it")
    return out


def run_labelled_harvest(cfg: LabelledHarvestConfig, loaded: Any = None) -> LabelledStore:
    """Read the datasets, split them, run the kept prompts through the model once and write the
    labelled store at cfg.out; -> the store. `loaded` reuses a LoadedModel (tests)."""
    import zarr

    from routesae.model.compute_dtype import pick_compute_dtype
    from routesae.model.hooks import HiddenStateCapture
    from routesae.model.loading import check_layers_and_length, load_model, resolve_device, resolve_dtype
    from routesae.model.special_tokens import SpecialTokens
    from routesae.store.zarr_store import ZARR_DTYPES, _bits, value_attributes

    if not cfg.datasets:
        raise RouteSAEError("no dataset given: pass --dataset NAME or FILE (or --preset)")
    if cfg.max_len < 2:
        raise RouteSAEError("--max-len must be at least 2 (BOS and one token)")
    if cfg.batch_size < 1:
        raise RouteSAEError("--batch-size must be at least 1")
    out = _check_out(cfg)
    storage, _ = resolve_dtype(cfg.dtype)
    # Everything cheap first: the datasets and their splits, then the model's config, then its weights.
    sets: list[ProbeDataset] = []
    splits = []
    for spec in cfg.datasets:
        data = load_dataset(spec)
        if any(data.name == s.name for s in sets):
            raise RouteSAEError(f"dataset {data.name} given twice")
        sets.append(data)
        splits.append(split(data.labels, data.name, cfg.seed, cfg.max_train, cfg.max_test))
    config, _, layers = check_layers_and_length(cfg.model, loaded, cfg.layers, cfg.max_len, "--max-len")
    if loaded is None:
        device = resolve_device(cfg.device)
        compute = pick_compute_dtype(cfg.compute_dtype, storage, device, source="storage")
        if cfg.progress:
            tqdm.write(f"loading {cfg.model} in {compute.name} ({compute.reason}) ...", file=sys.stderr)
        loaded = load_model(cfg.model, compute.name, str(device), config=config)
    info = loaded.info
    model, tokenizer = loaded.model, loaded.tokenizer
    special = SpecialTokens.of(tokenizer)
    device = next(model.parameters()).device
    d_model = int(info["d_model"])
    torch_storage = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[storage]
    total = sum(len(s.train) + len(s.test) for s in splits)

    if out.exists() and cfg.overwrite:
        shutil.rmtree(out)
    records = []
    with atomic_directory(out) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        acts = {}
        for layer in layers:
            acts[layer] = group.create_array(f"acts/{layer}", shape=(total, d_model), dtype=ZARR_DTYPES[storage],
                                             chunks=(ROW_CHUNK, d_model))
            acts[layer].attrs.update(value_attributes(storage, layer))
        columns = {name: np.zeros(total, dtype=dtype) for name, dtype in
                   (("labels", np.int8), ("dataset", np.int16), ("split", np.int8), ("position", np.int32),
                    ("length", np.int32))}
        at = 0
        with HiddenStateCapture(model, layers) as capture:
            for index, (data, sp) in enumerate(zip(sets, splits)):
                rows = np.concatenate([sp.train, sp.test])
                n = len(rows)
                encoded = tokenizer([data.prompts[i] for i in rows], add_special_tokens=False)["input_ids"]
                ids = [context_ids(list(body), special.bos, cfg.max_len) for body in encoded]
                lengths = np.array([len(x) for x in ids])
                block = torch.empty(len(layers), n, d_model, dtype=torch_storage)
                bar = tqdm(total=n, unit="prompt", desc=data.name, disable=not cfg.progress, dynamic_ncols=True,
                           leave=False)
                for members in batches(lengths, cfg.batch_size, cfg.batch_tokens):
                    width = int(lengths[members].max())
                    padded = torch.full((len(members), width), special.eos, dtype=torch.long)
                    for j, m in enumerate(members):
                        padded[j, : lengths[m]] = torch.tensor(ids[m])
                    hidden = capture(padded.to(device))  # [n_layers, b, width, d]
                    where = torch.tensor([read_position(ids[m], special.flagged) for m in members],
                                         device=hidden.device)
                    picked = hidden[:, torch.arange(len(members), device=hidden.device), where]
                    block[:, torch.from_numpy(members)] = picked.to("cpu", torch_storage)
                    bar.update(len(members))
                bar.close()
                for i, layer in enumerate(layers):
                    acts[layer][at:at + n] = _bits(block[i].contiguous())
                columns["labels"][at:at + n] = data.labels[rows]
                columns["dataset"][at:at + n] = index
                columns["split"][at:at + n] = np.r_[np.zeros(len(sp.train)), np.ones(len(sp.test))]
                columns["position"][at:at + n] = [read_position(x, special.flagged) for x in ids]
                columns["length"][at:at + n] = lengths
                records.append({
                    "name": data.name, "source": data.source, "classes": list(data.classes),
                    "one_vs_rest": data.one_vs_rest, "n_rows": len(data.prompts), "train": len(sp.train),
                    "test": len(sp.test), "start": at, "truncated": int(sum(len(b) > cfg.max_len - 1 for b in encoded)),
                })
                at += n
                if cfg.progress:
                    tqdm.write(f"{data.name}: {len(sp.train):,} train + {len(sp.test):,} test prompts, "
                               f"{int(lengths.sum()):,} tokens", file=sys.stderr)
        for name, values in columns.items():
            group.create_array(name, shape=(total,), dtype=values.dtype, chunks=(ROW_CHUNK,))[:] = values
        group.attrs[ATTR_KEY] = {
            "schema_version": SCHEMA_VERSION,
            "model": {**info, "dtype": storage, "compute_dtype": info["dtype"]},
            "layers": layers,
            "d_model": d_model,
            "storage_dtype": storage,
            "max_len": cfg.max_len,
            "seed": cfg.seed,
            "max_train": cfg.max_train,
            "max_test": cfg.max_test,
            "n_prompts": total,
            "datasets": records,
            "package_version": __version__,
        }
    return LabelledStore.open(out)
