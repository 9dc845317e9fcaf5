"""A fit killed by SIGKILL and started again with the same command ends with the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kill_points import start_at_checkpoint
from synthetic_store import make_store


def fit_command(store, out) -> list[str]:
    return [sys.executable, "-m", "routesae.cli", "fit", "--cache", str(store), "--out", str(out),
            "--arch", "topk,routesae,jumprelu", "--k", "4,8", "--latents", "64", "--batch-size", "64",
            "--buffer-tokens", "256", "--epochs", "2", "--checkpoint-every", "7", "--log-every", "5",
            "--no-progress"]


def env() -> dict[str, str]:
    # the same thread count in every run: float sums may depend on it
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_to_end(store, out) -> str:
    r = subprocess.run(fit_command(store, out), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stderr


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "s.zarr"
    make_store(path, 4096, d_model=16, layers=list(range(9)), n_model_layers=8, chunk_contexts=4)
    return path


def test_sigkill_then_rerun_gives_the_uninterrupted_weights(store, tmp_path):
    assert "resuming" not in run_to_end(store, tmp_path / "clean")

    out = tmp_path / "killed"
    ckpt = out / "checkpoint.pt"
    kills = 0
    for delay in (0.0, 0.05):  # kill twice: right at a checkpoint, and a little after one
        proc = start_at_checkpoint(fit_command(store, out), ckpt, delay, env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "the fit ended before it could be killed: make it longer"
    assert ckpt.exists() and not (out / "topk-k4" / "config.json").exists()
    step = torch.load(ckpt, weights_only=True)["step"]
    said = [line for line in run_to_end(store, out).splitlines() if line.startswith("resuming")]
    assert len(said) == 1 and said[0].startswith(f"resuming {out} at step {step} ("), said
    assert not ckpt.exists()

    for name in ("topk-k4", "topk-k8", "routesae-k4", "routesae-k8", "jumprelu-k4", "jumprelu-k8"):
        clean = load_file(str(tmp_path / "clean" / name / "sae.safetensors"))
        resumed = load_file(str(out / name / "sae.safetensors"))
        for key in clean:
            assert torch.equal(clean[key], resumed[key]), (name, key)
        # the metrics log has each line once, as the uninterrupted run's
        strip = lambda p: [line.rsplit('"tokens_per_s"', 1)[0] for line in p.read_text().splitlines()]  # noqa: E731
        assert strip(out / name / "metrics.jsonl") == strip(tmp_path / "clean" / name / "metrics.jsonl")
