"""--target-l0 on a small harvested store (the synthetic one is in test_train_baselines.py): the
SAEs without a k (vanilla, gated, JumpReLU) end within 10% of the target L0 on the store's
held-out tail, measured as eval measures it.

The store is harvested from the tiny Llama of tiny_models.py through the real pipeline. It needs
enough tokens that the SAEs do not overfit them: on 4,096 tokens (SmolLM2, 1,152 latents) gated
ended at 19.1 and JumpReLU at 32.3 on held-out tokens for a target of 16, having hit it on the
tokens they trained on. Here 29,000 training tokens for 256 latents, three passes."""

from __future__ import annotations

import pytest

from routesae.evaluate.run import EvalConfig, run_eval
from routesae.harvest.run import HarvestConfig, run_harvest
from routesae.train.config import FitConfig
from routesae.train.trainer import fit

ARCHS = ["vanilla", "gated", "jumprelu"]
TARGET = 8


@pytest.fixture(scope="module")
def fitted(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("target-l0")
    run_harvest(HarvestConfig(out=str(root / "s.zarr"), model=str(tiny_llama_dir), dataset="builtin", tokens=32768,
                              layers="3", context_len=64, batch_size=16, progress=False, min_chunk_bytes=1 << 16))
    fit(FitConfig(cache=str(root / "s.zarr"), out=str(root / "runs"), archs=ARCHS, ks=[TARGET], target_l0=TARGET,
                  latents=256, layer=3, batch_size=256, epochs=3, eval_tokens=0.1, progress=False))
    return root


def test_target_l0_lands_within_ten_percent_on_held_out_tokens_of_a_harvested_store(fitted):
    report = run_eval(EvalConfig(saes=[str(fitted / "runs" / f"{a}-k{TARGET}") for a in ARCHS],
                                 cache=str(fitted / "s.zarr"), progress=False))
    l0 = {row.arch: row.cache.l0 for row in report.rows}
    assert set(l0) == set(ARCHS)
    # measured (tiny Llama, seed 0): vanilla 8.08, gated 8.15, JumpReLU 8.59
    for arch, value in l0.items():
        assert abs(value / TARGET - 1) <= 0.1, (arch, value)
