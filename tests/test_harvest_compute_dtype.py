"""Harvest's compute dtype: a bf16 store is computed in float32 on a CPU without native bf16 (and
rounded when stored), recorded as such, kept on resume, and rerun in it by repair."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from routesae.cli import main
from routesae.errors import RouteSAEError
from routesae.harvest.run import HarvestConfig, _compute_dtype, run_harvest
from routesae.model.loading import load_store_model
from routesae.ranks import Ranks
from routesae.store.zarr_store import Cache

CTX = 32


def _cpu_has(monkeypatch, *dtypes: str) -> None:
    monkeypatch.setattr("routesae.model.compute_dtype.native_cpu_dtypes", lambda: frozenset(dtypes))


def _harvest(model_dir, out, **kw):
    cfg = dict(out=str(out), model=str(model_dir), dataset="builtin", tokens=1024, layers="all", context_len=CTX,
               batch_size=4, progress=False, min_chunk_bytes=1024, device="cpu")
    return run_harvest(HarvestConfig(**{**cfg, **kw}))


def _forward(folder, dtype: torch.dtype, ids: torch.Tensor):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("native,compute", [((), torch.float32), (("bfloat16",), torch.bfloat16)])
def test_a_bf16_store_is_the_native_forward_rounded(native, compute, monkeypatch, tiny_llama_dir, tmp_path):
    _cpu_has(monkeypatch, *native)
    cache = _harvest(tiny_llama_dir, tmp_path / "s.zarr", dtype="bfloat16")
    assert cache.model["dtype"] == "bfloat16" and cache.storage_dtype == "bfloat16"
    assert cache.model["compute_dtype"] == str(compute).removeprefix("torch.")
    ids = cache.token_ids(0, 4 * CTX).view(4, CTX).long()
    hidden = _forward(tiny_llama_dir, compute, ids)  # the same batch harvest ran
    for layer in cache.layers:
        want = hidden[layer].reshape(-1, cache.d_model).to(torch.bfloat16)
        assert torch.equal(cache.acts_stored(layer, 0, 4 * CTX), want), layer  # bit for bit


def test_explicit_compute_dtype_and_the_reruns_use_the_recorded_one(monkeypatch, tiny_llama_dir, tmp_path):
    _cpu_has(monkeypatch, "bfloat16")  # auto would pick bf16 here: the explicit float32 must win
    cache = _harvest(tiny_llama_dir, tmp_path / "s.zarr", dtype="bfloat16", compute_dtype="float32")
    assert cache.model["compute_dtype"] == "float32"
    loaded = load_store_model(cache.path, cache.model, None, "cpu", "test")
    assert next(loaded.model.parameters()).dtype == torch.float32  # eval --splice and repair rerun it so


def test_resume_keeps_the_recorded_compute_dtype(monkeypatch):
    ranks = Ranks(0, 1, 0)
    cfg = HarvestConfig(out="unused", dtype="bfloat16", device="cpu")
    begun = {"model": {"dtype": "bfloat16", "compute_dtype": "float32"}}
    _cpu_has(monkeypatch, "bfloat16")
    assert _compute_dtype(cfg, begun, "bfloat16", ranks, None).name == "float32"  # as the store was begun
    assert _compute_dtype(cfg, {"model": {"dtype": "bfloat16"}}, "bfloat16", ranks, None).name == "bfloat16"  # older
    assert _compute_dtype(cfg, None, "bfloat16", ranks, None).name == "bfloat16"  # new, native
    _cpu_has(monkeypatch)
    assert _compute_dtype(cfg, None, "bfloat16", ranks, None).name == "float32"  # new, not native
    over = HarvestConfig(out="unused", dtype="bfloat16", device="cpu", overwrite=True)
    assert _compute_dtype(over, begun, "bfloat16", ranks, None).name == "float32"  # replaced: chosen afresh
    with pytest.raises(RouteSAEError):
        _compute_dtype(HarvestConfig(out="u", compute_dtype="int4"), None, "bfloat16", ranks, None)


def test_an_unfinished_store_refuses_another_compute_dtype(monkeypatch, tiny_llama_dir, tmp_path):
    _cpu_has(monkeypatch)
    out = tmp_path / "s.zarr"
    _harvest(tiny_llama_dir, out, dtype="bfloat16", tokens=2048, shard_tokens=512)
    # make it unfinished again: the store says so in its own attributes
    import zarr

    group = zarr.open_group(str(out), mode="r+")
    attrs = group.attrs.asdict()["routesae"]
    assert attrs["model"]["compute_dtype"] == "float32"
    group.attrs.update({"routesae": {**attrs, "progress": {**attrs["progress"], "complete": False}}})
    with pytest.raises(RouteSAEError, match="compute_dtype"):
        _harvest(tiny_llama_dir, out, dtype="bfloat16", tokens=2048, shard_tokens=512, compute_dtype="bfloat16")


def test_repair_reruns_a_float32_forward_bit_for_bit(monkeypatch, tiny_llama_dir, tmp_path):
    _cpu_has(monkeypatch, "bfloat16")  # repair must follow the record, not this CPU
    original = tmp_path / "orig.zarr"
    _harvest(tiny_llama_dir, original, dtype="bfloat16", compute_dtype="float32", tokens=2048, shard_tokens=512)
    want = {str(p.relative_to(original)): p.read_bytes() for p in sorted(original.rglob("*")) if p.is_file()}
    store = tmp_path / "s.zarr"
    shutil.copytree(original, store)
    (store / "acts" / "2" / "c" / "1" / "0").unlink()
    r = CliRunner().invoke(main, ["repair", "--quiet", str(store)])
    assert r.exit_code == 0, r.output
    got = {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    assert got == want
    assert Cache.open(store).model["compute_dtype"] == "float32"
