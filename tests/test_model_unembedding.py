"""The output embedding read alone equals the one of the fully loaded model, for the offline GGUF
and for local transformers folders (tied and untied heads, safetensors and the .bin fallback)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny, tiny_model

from routesae.errors import RouteSAEError
from routesae.model.loading import load_model
from routesae.model.unembedding import load_store_unembedding


def full_head(spec: str, dtype: str) -> tuple[torch.Tensor, dict]:
    loaded = load_model(spec, dtype, "cpu")
    return loaded.model.get_output_embeddings().weight.detach(), dict(loaded.info)


def test_offline_gguf_head_equals_the_loaded_models():
    want, info = full_head("smollm2", "bfloat16")
    got = load_store_unembedding(Path("store.zarr"), info, None, "unembed through")
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("kind,dtype", [("llama", "float32"), ("gpt2", "bfloat16")])
def test_local_folder_head_equals_the_loaded_models(tmp_path, kind, dtype):
    folder = save_tiny(kind, tmp_path / kind)
    want, info = full_head(str(folder), dtype)
    tied = tiny_model(kind).config.tie_word_embeddings
    assert tied == (kind == "gpt2")  # both kinds of head are covered
    got = load_store_unembedding(Path("store.zarr"), info, None, "unembed through")
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_bin_weights_fall_back_to_the_full_load(tmp_path):
    folder = tmp_path / "bin"
    save_tiny("llama", folder)
    model = tiny_model("llama")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(folder, safe_serialization=False)
    want, info = full_head(str(folder), "float32")
    assert torch.equal(load_store_unembedding(Path("store.zarr"), info, None, "unembed through"), want)


def test_another_revision_or_width_is_refused_in_one_line(tmp_path):
    folder = save_tiny("llama", tmp_path / "m")
    _, info = full_head(str(folder), "float32")
    with pytest.raises(RouteSAEError, match="refusing to unembed through a different model"):
        load_store_unembedding(Path("s.zarr"), {**info, "revision": "local-0000"}, None, "unembed through")
    with pytest.raises(RouteSAEError, match="d_model 64, the store says 32"):
        load_store_unembedding(Path("s.zarr"), {**info, "d_model": 32}, None, "unembed through")
