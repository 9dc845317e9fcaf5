"""`routesae steer --dtype`: an SAE recording a bf16 model is steered in float32 on a CPU without
native bf16 (model/compute_dtype.py), in bf16 on one with it, and as asked with an explicit dtype."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from routesae.cli import main
from routesae.model import compute_dtype
from test_steering import _sae, _save_sae
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def bf16_sae_dir(tmp_path_factory):
    from routesae.model.loading import load_model

    root = tmp_path_factory.mktemp("steer_dtype")
    model_dir = save_tiny("llama", root / "model")
    return _save_sae(root / "sae", _sae("topk"), load_model(str(model_dir), "bfloat16", "cpu").info)


@pytest.mark.parametrize("native, args, want", [
    (frozenset(), [], "float32"),
    (frozenset({"bfloat16"}), [], "bfloat16"),
    (frozenset(), ["--dtype", "bfloat16"], "bfloat16"),
    (frozenset({"bfloat16"}), ["--dtype", "float32"], "float32"),
])
def test_steer_picks_the_compute_dtype(bf16_sae_dir, monkeypatch, native, args, want):
    monkeypatch.setattr(compute_dtype, "native_cpu_dtypes", lambda: native)
    r = CliRunner().invoke(main, ["steer", "--sae", str(bf16_sae_dir), "--latent", "9", "--value", "30", "--prompt",
                                  "the cat", "--max-new-tokens", "2", "--device", "cpu", "--json", *args])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["dtype"] == want
