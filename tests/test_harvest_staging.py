"""The CUDA harvest's staging (harvest/host_staging.py) forced onto a CPU: every batch captured
into a device buffer, quantized and summed there, then copied into the shard buffer, must write
the same store, bit for bit, as the direct capture a CPU harvest uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import routesae.harvest.run as harvest_run
from routesae import Cache
from routesae.harvest.host_staging import HostStaging
from routesae.harvest.run import HarvestConfig, run_harvest
from routesae.store.verify import verify

CTX = 32


def _files(store: Path) -> dict[str, bytes]:
    """Every file of the store but the root metadata, by path."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p != store / "zarr.json"}


def _harvest(model_dir: Path, out: Path, storage: str, monkeypatch, staged: bool) -> list[HostStaging]:
    made: list[HostStaging] = []

    def staging(device, staged_=None):
        made.append(HostStaging(device, staged=staged))
        return made[-1]

    monkeypatch.setattr(harvest_run, "HostStaging", staging)
    # 1,536 tokens in batches of 5 contexts: shards of 512 tokens end mid-batch, the last batch is short
    run_harvest(HarvestConfig(out=str(out), model=str(model_dir), dataset="builtin", tokens=1536, layers="all",
                              context_len=CTX, batch_size=5, progress=False, min_chunk_bytes=1024, dtype="bfloat16",
                              compute_dtype="float32", storage=storage, shard_tokens=512))
    return made


@pytest.mark.parametrize("storage", ["model", "int8"])
def test_a_staged_harvest_writes_the_same_store(storage, tiny_llama_dir, tmp_path, monkeypatch):
    direct = _harvest(tiny_llama_dir, tmp_path / "direct.zarr", storage, monkeypatch, staged=False)
    staged = _harvest(tiny_llama_dir, tmp_path / "staged.zarr", storage, monkeypatch, staged=True)
    assert sum(s.staged_batches for s in direct) == 0
    assert sum(s.staged_batches for s in staged) >= 10  # every batch went through the device buffer
    want, got = _files(tmp_path / "direct.zarr"), _files(tmp_path / "staged.zarr")
    assert sorted(got) == sorted(want) and any("acts" in k for k in want)
    assert [k for k in want if want[k] != got[k]] == []
    stats = [json.loads((tmp_path / f"{name}.zarr" / "zarr.json").read_text())["attributes"]["routesae"]["progress"]
             ["stats"] for name in ("direct", "staged")]
    assert stats[0] == stats[1] and stats[0]["count"] > 0
    assert verify(Cache.open(tmp_path / "staged.zarr"), progress=False).damage == []
    if storage == "int8":  # shards of 480 tokens: special rows in chunks of 32; read back exact
        _harvest(tiny_llama_dir, tmp_path / "exact.zarr", "model", monkeypatch, staged=True)
        int8, exact = Cache.open(tmp_path / "staged.zarr"), Cache.open(tmp_path / "exact.zarr")
        special = exact.special(0, exact.n_tokens)
        assert int(special.sum()) > 10
        for layer in exact.layers:
            assert torch.equal(int8.acts(layer, 0, int8.n_tokens)[special], exact.acts(layer, 0, exact.n_tokens)[special])
