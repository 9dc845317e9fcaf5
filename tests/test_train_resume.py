"""A fit killed by SIGKILL and started again with the same command ends with the same weights; one
stopped by Ctrl-C says what it kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import kill_points
from kill_points import start_paused
from synthetic_store import make_store


FIT_ARGS = ["--arch", "topk,routesae,jumprelu", "--k", "4,8", "--latents", "64", "--batch-size", "64",
            "--buffer-tokens", "256", "--epochs", "2", "--checkpoint-every", "7", "--log-every", "5", "--no-progress"]


def fit_command(store, out) -> list[str]:
    return [sys.executable, "-m", "routesae.cli", "fit", "--cache", str(store), "--out", str(out), *FIT_ARGS]


def paused_fit(store, out) -> list[str]:
    """The same fit under kill_points, to be stopped at a kill point."""
    return kill_points.command("fit", "--cache", store, "--out", out, *FIT_ARGS)


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


@pytest.fixture(scope="module")
def clean(store, tmp_path_factory):
    """The fit run once from start to end, never stopped."""
    out = tmp_path_factory.mktemp("clean") / "fit"
    assert "resuming" not in run_to_end(store, out)
    return out


def whole_steps(clean) -> int:
    """Steps of the whole fit, as the finished fit records them."""
    return json.loads((clean / "topk-k4" / "config.json").read_text())["training"]["steps"]


def test_sigkill_then_rerun_gives_the_uninterrupted_weights(store, clean, tmp_path):

    out = tmp_path / "killed"
    ckpt = out / "checkpoint.pt"
    # Killed three times, each run resuming from the last one's checkpoint: right after its first
    # checkpoint (step 7), three steps after its first (step 14, killed at 17), and in the middle
    # of writing its first (step 21: the new file whole under its temporary name, not yet renamed).
    for point in ("checkpoint:1", "after-checkpoint:1+3", "in-checkpoint:1"):
        proc = start_paused(paused_fit(store, out), point, tmp_path / "markers", env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ckpt.exists() and not (out / "topk-k4" / "config.json").exists()
    assert any(p.name.startswith(".checkpoint.pt.") for p in out.iterdir())  # the killed write's file
    step = torch.load(ckpt, weights_only=True)["step"]
    assert step == 14
    said = [line for line in run_to_end(store, out).splitlines() if line.startswith("resuming")]
    assert len(said) == 1 and said[0].startswith(f"resuming {out} at step {step} ("), said
    assert not ckpt.exists()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["fit.json"]  # no leftover of the kill

    for name in ("topk-k4", "topk-k8", "routesae-k4", "routesae-k8", "jumprelu-k4", "jumprelu-k8"):
        whole = load_file(str(clean / name / "sae.safetensors"))
        resumed = load_file(str(out / name / "sae.safetensors"))
        for key in whole:
            assert torch.equal(whole[key], resumed[key]), (name, key)
        # the metrics log has each line once, as the uninterrupted run's
        strip = lambda p: [line.rsplit('"tokens_per_s"', 1)[0] for line in p.read_text().splitlines()]  # noqa: E731
        assert strip(out / name / "metrics.jsonl") == strip(clean / name / "metrics.jsonl")


def interrupted(proc: subprocess.Popen) -> str:
    """Ctrl-C the paused command; -> its last line on stderr (exit 130 checked)."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err.decode()[-3000:]
    return err.decode().strip().splitlines()[-1]


def test_ctrl_c_says_which_checkpoint_is_kept_and_the_rerun_resumes_from_it(store, clean, tmp_path):
    out = tmp_path / "fit"
    proc = start_paused(paused_fit(store, out), "after-checkpoint:2+3", tmp_path / "markers", env(),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    said = interrupted(proc)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 14
    steps = whole_steps(clean)
    assert said == (f"routesae: interrupted; fit stopped after step 17 of {steps}; the checkpoint at step 14 is kept, "
                    "rerun the same command to resume"), said
    resumed = [line for line in run_to_end(store, out).splitlines() if line.startswith("resuming")]
    assert resumed and resumed[0].startswith(f"resuming {out} at step 14 ("), resumed


def test_ctrl_c_before_the_first_checkpoint_says_nothing_is_kept_and_leaves_nothing(store, clean, tmp_path):
    out = tmp_path / "fit"
    proc = start_paused(paused_fit(store, out), "step:5", tmp_path / "markers", env(),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    said = interrupted(proc)
    steps = whole_steps(clean)
    assert said == (f"routesae: interrupted; fit stopped after step 5 of {steps}, before the first checkpoint "
                    "(every 7 steps or 10 minutes); nothing is kept yet"), said
    assert not out.exists()  # the folder it created, fit.json and the metrics so far are gone

