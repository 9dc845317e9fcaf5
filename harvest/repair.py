"""`routesae repair`: harvest again the shards of a store that `verify` found damaged, and write them
back, so that the store ends as the harvest first wrote it.

A harvest is deterministic: the same corpus packs into the same contexts, and the same forward
batches give the same activations bit for bit on the same machine. Repair re-packs the corpus up to
the last damaged shard (tokenizing only; the model runs on the damaged shards alone), and before it
writes anything it checks, for each shard, that the re-packed token ids equal the stored ones and
that the recomputed activations equal the stored ones on every layer whose file is intact. Where
either differs (another corpus or tokenizer; kernels that round differently, as on another GPU)
it refuses, since the store would then mix two harvests: harvest it again whole instead.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from routesae.errors import RouteSAEError
from routesae.harvest.host_staging import HostStaging
from routesae.model.hooks import HiddenStateCapture
from routesae.harvest.corpus import document_source, shuffled
from routesae.model.loading import LoadedModel, load_store_model
from routesae.harvest.packing import PackState, pack_contexts
from routesae.model.special_tokens import SpecialTokens
from routesae.store.zarr_store import TORCH_DTYPES, Cache, StoreWriter
from routesae.store.verify import Damage, verify

DEFAULT_BATCH = 8
"""Contexts per forward for stores that do not record the harvest's (routesae 0.1.0 before it did)."""


@dataclass
class RepairConfig:
    """The arguments of `routesae repair`."""

    store: str
    """The store to repair in place."""
    model: str | None = None
    """Load the model from here instead of the store's recorded id (its revision must match)."""
    dataset: str | None = None
    """Read the corpus from here instead of the store's recorded dataset id (a moved file)."""
    device: str = "auto"
    """'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ..."""
    progress: bool = True
    """Show progress bars."""


class RepairResult(NamedTuple):
    """What a repair did."""

    shards: list[int]
    """The shards harvested again and rewritten (empty: nothing was damaged)."""
    files_rewritten: int
    """Damaged files replaced."""
    files_compared: int
    """Intact activation files of those shards that the recomputation matched bit for bit."""


def shard_of(cache: Cache, damage: Damage) -> int | None:
    """The shard a damaged file holds, or None where the damage is an array's (a statistics mismatch)."""
    rel = damage.path.relative_to(cache.path / damage.array)
    if rel.parts[:1] != ("c",) or len(rel.parts) < 2:
        return None
    return int(rel.parts[1])


def repair_store(cfg: RepairConfig, loaded: LoadedModel | None = None) -> RepairResult:
    """Find the damaged shards of cfg.store, harvest them again, check and write them.

    `loaded`: the store's model, already loaded (tests)."""
    cache = Cache.open(cfg.store)
    found = verify(cache, progress=cfg.progress).damage
    if not found:
        return RepairResult([], 0, 0)
    unplaced = [d for d in found if shard_of(cache, d) is None]
    if unplaced:
        d = unplaced[0]
        raise RouteSAEError(f"{d.path}: {d.problem}, in no file that can be named: harvest the store again "
                            "(cache_schema.md, 'Damage and repair')")
    if cache.quantized:
        raise RouteSAEError(f"{cache.path} is an int8 store: repair rewrites only stores kept in the model's dtype; "
                            "harvest it again (into a new folder or with --overwrite)")
    damaged: dict[int, set[Path]] = {}
    for d in found:
        damaged.setdefault(shard_of(cache, d), set()).add(d.path)

    dataset = cache.attrs["dataset"]
    documents = document_source(cfg.dataset or dataset["id"], dataset["split"], dataset["text_field"])
    if loaded is None:
        loaded = load_store_model(cache.path, cache.model, cfg.model, cfg.device, "repair with")
    writer = StoreWriter.open(cache.path)
    ctx = cache.context_len
    shard_ctx = cache.layout.shard_tokens // ctx
    contexts = pack_contexts(lambda: shuffled(documents(), int(cache.attrs["seed"]), int(dataset["shuffle_buffer"])),
                             loaded.tokenizer, ctx, PackState())
    special = SpecialTokens.of(loaded.tokenizer)
    batch = cache.harvest_batch_size or DEFAULT_BATCH
    bar = tqdm(total=len(damaged), unit="shard", desc="repair", disable=not cfg.progress, dynamic_ncols=True)
    rewritten = compared = 0
    done_ctx = 0
    try:
        with HiddenStateCapture(loaded.model, cache.layers) as capture:
            for shard in sorted(damaged):
                first = shard * shard_ctx
                # contexts before this shard are packed (tokenized) and dropped: no forward
                skip = first - done_ctx
                skipped = sum(1 for _ in itertools.islice(contexts, skip))
                n_ctx = min(shard_ctx, cache.n_tokens // ctx - first)
                ids = [c for c, _ in itertools.islice(contexts, n_ctx)]
                done_ctx = first + len(ids)
                if skipped != skip or len(ids) != n_ctx:
                    raise RouteSAEError(f"the dataset ran out before shard {shard}: it is not the corpus the store was "
                                        "harvested from (pass --dataset if it moved)")
                token_ids = np.concatenate(ids)
                acts = _forward(capture, loaded, np.stack(ids), batch, cache)
                compared += _check_against_store(cache, shard, token_ids, acts, damaged[shard])
                for path in damaged[shard]:
                    path.unlink(missing_ok=True)
                    rewritten += 1
                writer.write_contexts(shard, acts, token_ids, special.mask(token_ids))
                bar.update(1)
    finally:
        bar.close()
    return RepairResult(sorted(damaged), rewritten, compared)


def _forward(capture: HiddenStateCapture, loaded: LoadedModel, ids: np.ndarray, batch: int, cache: Cache) -> torch.Tensor:
    """The shard's activations [n_layers, n_ctx * ctx, d_model] in the storage dtype, computed in
    the harvest's batches (a shard starts a batch, so they are the same batches) and brought to the
    host as the harvest brings them (host_staging.py)."""
    n_ctx, ctx = ids.shape
    staging = HostStaging(next(loaded.model.parameters()).device)
    out = staging.host_empty((len(cache.layers), n_ctx * ctx, cache.d_model), TORCH_DTYPES[cache.storage_dtype])
    for at in range(0, n_ctx, batch):
        part = ids[at : at + batch]
        dest = out[:, at * ctx : (at + len(part)) * ctx]
        staging.to_host(staging.capture(capture, torch.from_numpy(part).long(), dest), dest)
    staging.wait()
    return out


def _check_against_store(cache: Cache, shard: int, token_ids: np.ndarray, acts: torch.Tensor, broken: set[Path]) -> int:
    """Refuse unless the recomputed shard equals what its intact files hold. -> activation files compared."""
    start = shard * cache.layout.shard_tokens
    stop = start + token_ids.shape[0]
    ids_file = next((p for p in broken if p.is_relative_to(cache.path / "token_ids")), None)
    if ids_file is None and not np.array_equal(cache.token_ids(start, stop).numpy(), token_ids):
        raise RouteSAEError(f"the corpus packs into other tokens than shard {shard} of {cache.path} holds (another "
                            "dataset, order or tokenizer): refusing to mix two harvests; harvest the store again")
    compared = 0
    for i, layer in enumerate(cache.layers):
        if any(p.is_relative_to(cache.path / "acts" / str(layer)) for p in broken):
            continue
        stored = cache.acts_stored(layer, start, stop)
        if not torch.equal(_bits(stored), _bits(acts[i])):
            diff = float((stored.float() - acts[i].float()).abs().max())
            raise RouteSAEError(
                f"this machine's forward differs from the harvest's on layer {layer} of shard {shard} (max |diff| "
                f"{diff:.3g}): the rewritten files would not be the harvest's; harvest the store again here")
        compared += 1
    return compared


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: equal bits, not equal values (-0.0 and NaN payloads count)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def repair_summary(result: RepairResult, store: str) -> str:
    if not result.shards:
        return f"{store}: no damaged file, nothing to repair"
    return (f"repaired {store}: {result.files_rewritten} damaged file(s) in shard(s) "
            f"{', '.join(map(str, result.shards))} harvested again; {result.files_compared} intact activation file(s) "
            "of those shards matched the recomputation bit for bit")
