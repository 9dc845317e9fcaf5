"""8-bit storage: int8 values with a per-token absmax scale, special tokens exact, readers dequantize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from routesae import RouteSAEError
from routesae.cli import main
from routesae.harvest.run import HarvestConfig, run_harvest
from routesae.store.int8 import dequantize, quantize

HARVEST = dict(dataset="builtin", tokens=4096, layers="all", context_len=32, batch_size=4, shard_tokens=1024,
               min_chunk_bytes=1024, dtype="float32", device="cpu", progress=False)


def test_quantize_known_answer():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize(x)
    assert scale.tolist() == pytest.approx([2 / 127, 0.0])
    # 1 / (2/127) = 63.5 rounds to even (64); 0.5 / (2/127) = 31.75 -> 32
    assert q.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0]] and q.dtype == torch.int8
    back = dequantize(q, scale, torch.float32)
    assert back[0].tolist() == pytest.approx([64 * 2 / 127, -2.0, 32 * 2 / 127, 0.0])
    assert back[1].tolist() == [0, 0, 0, 0]


@pytest.fixture(scope="module")
def stores(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    exact = run_harvest(HarvestConfig(out=str(root / "exact.zarr"), model=str(tiny_llama_dir), **HARVEST))
    int8 = run_harvest(HarvestConfig(out=str(root / "int8.zarr"), model=str(tiny_llama_dir), storage="int8", **HARVEST))
    return exact, int8


def test_int8_reads_are_close_and_special_rows_exact(stores):
    exact, int8 = stores
    assert int8.quantized and not exact.quantized and int8.storage_dtype == "float32"
    assert int8.attrs["schema_version"] == 2 and exact.attrs["schema_version"] == 1
    assert torch.equal(int8.token_ids(), exact.token_ids())
    special = exact.special()
    for layer in exact.layers:
        x, y = exact.acts(layer, 0, 4096), int8.acts(layer, 0, 4096)
        assert torch.equal(y[special], x[special])
        # each element off by at most half a quantization step of its row
        step = x.abs().amax(1, keepdim=True) / 127
        assert ((y - x).abs() <= step / 2 * 1.0001 + 1e-7).all()
        rel = ((y - x)[~special].pow(2).sum(1) / x[~special].pow(2).sum(1)).mean()
        assert 0 < rel < 1e-3
        # an unaligned range across a shard boundary reads the same rows
        assert torch.equal(int8.acts(layer, 1000, 1100), y[1000:1100])
    # float32 -> int8 + a scale is 68 / 256 bytes; the exact special rows (a BOS every 32 tokens here) are
    # stored in chunks of 64 rows from each shard's start
    per_shard = special.view(-1, int8.layout.shard_tokens).sum(1)
    special_rows = int((-(-per_shard // 64) * 64).sum()) * len(exact.layers)
    assert int8.nbytes_acts_on_disk() < 1.02 * (68 / 256 * exact.nbytes_acts_on_disk() + special_rows * 256)


def test_int8_store_read_by_plain_zarr(stores):
    """The recipe of cache_schema.md, written from the schema: q * scale, special rows from special_acts."""
    _, int8 = stores
    group = zarr.open_group(str(int8.path), mode="r")
    layer, shard_tokens = 2, int8.layout.shard_tokens
    q = group[f"acts/{layer}"][:].astype(np.float32)
    values = q * group[f"scales/{layer}"][:][:, None]
    special = group["special"][:]
    exact = group[f"special_acts/{layer}"]
    for shard in range(-(-special.size // shard_tokens)):
        where = np.flatnonzero(special[shard * shard_tokens : (shard + 1) * shard_tokens]) + shard * shard_tokens
        values[where] = exact[shard * shard_tokens : shard * shard_tokens + where.size]
    np.testing.assert_array_equal(values, int8.acts(layer, 0, int8.n_tokens).numpy())
    assert group[f"acts/{layer}"].attrs["value_dtype"] == "float32"


def test_int8_store_verifies_fits_and_refuses_repair(stores, tmp_path):
    _, int8 = stores
    info = CliRunner().invoke(main, ["info", "--verify", "--quiet", str(int8.path)])
    assert info.exit_code == 0, info.output
    assert "as int8" in info.output and "68 bytes per token per layer" in info.output  # 64 int8 + a float32 scale
    r = CliRunner().invoke(main, ["fit", "--cache", str(int8.path), "--out", str(tmp_path / "runs"), "--arch", "topk",
                                  "--k", "8", "--latents", "64", "--batch-size", "128", "--tokens", "2048",
                                  "--layer", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "runs" / "sae.safetensors").is_file()
    from routesae.harvest.repair import RepairConfig, repair_store

    first = next((int8.path / "acts" / "2" / "c").iterdir())
    shard_file = next(first.iterdir())
    shard_file.write_bytes(shard_file.read_bytes()[:100])  # truncate it
    with pytest.raises(RouteSAEError, match="int8 store"):
        repair_store(RepairConfig(str(int8.path), progress=False))


def test_an_unknown_storage_is_refused_before_anything_is_written(tiny_llama_dir, tmp_path):
    with pytest.raises(RouteSAEError, match="--storage 'int4'"):
        run_harvest(HarvestConfig(out=str(tmp_path / "t.zarr"), model=str(tiny_llama_dir), storage="int4",
                                  **{**HARVEST, "tokens": 1024}))
    assert not (tmp_path / "t.zarr").exists()
