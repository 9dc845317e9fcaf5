"""A finished store read without routesae: plain zarr, and xarray + dask through the recipe in
cache_schema.md, give the activations Cache gives, with no warning about missing metadata."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
import zarr

from synthetic_store import make_store

xr = pytest.importorskip("xarray")
pytest.importorskip("dask")


@pytest.fixture
def bf16_store(tmp_path):
    return make_store(tmp_path / "s.zarr", 256, d_model=8, layers=[2, 3, 10], storage_dtype="bfloat16",
                                 compression="none")


def test_each_activation_array_says_what_its_bits_are(bf16_store):
    group = zarr.open_group(str(bf16_store.path), mode="r")
    for layer in (2, 3, 10):
        attrs = group[f"acts/{layer}"].attrs
        assert attrs["layer"] == layer and attrs["value_dtype"] == "bfloat16"
        # the attribute's advice works on the raw array
        raw = group[f"acts/{layer}"][:16]
        assert raw.dtype == np.uint16
        np.testing.assert_array_equal(raw.view(ml_dtypes.bfloat16).astype(np.float32),
                                      bf16_store.acts(layer, 0, 16).numpy())


def test_xarray_recipe_gives_the_cache_values_without_warnings(bf16_store):
    path = str(bf16_store.path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no consolidated metadata" warning, nor any other
        # --- the recipe of cache_schema.md, "Reading a store without routesae" ---
        acts = xr.open_zarr(path, group="acts")
        x = xr.concat([acts[k] for k in sorted(acts.data_vars, key=int)], "layer").assign_coords(
            layer=sorted(map(int, acts.data_vars)))
        x = x.copy(data=x.data.view(ml_dtypes.bfloat16))
        # ---
        assert x.dims == ("layer", "token", "d_model") and x.sizes["token"] == 256
        got = x.sel(layer=10).isel(token=slice(40, 90)).astype("float32").values
    want = bf16_store.acts(10, 40, 90).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(x.layer.values, [2, 3, 10])
    tokens = xr.open_zarr(path)
    np.testing.assert_array_equal(tokens["token_ids"].values, bf16_store.token_ids().numpy())
    assert tokens["special"].values.sum() == 256 // 16


def test_consolidated_metadata_only_once_complete(tmp_path):
    unfinished = make_store(tmp_path / "u.zarr", 64, d_model=4, layers=[1], finish=False)
    assert zarr.open_group(str(unfinished.path), mode="r").metadata.consolidated_metadata is None
    done = make_store(tmp_path / "d.zarr", 64, d_model=4, layers=[1])
    meta = zarr.open_group(str(done.path), mode="r").metadata.consolidated_metadata
    assert meta is not None and meta.flattened_metadata["acts/1"].shape == (64, 4)
    assert done.complete and done.acts(1, 0, 64).shape == (64, 4)
