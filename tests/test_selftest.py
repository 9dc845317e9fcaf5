"""`routesae selftest`: its CPU tiny mode runs every stage and holds every check; a perturbed
reference fails its check and the exit code is 1; the checks themselves catch what they exist for."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from routesae.selftest import run as selftest_run
from routesae.selftest.checks import ACT_TOLERANCE, activation_check, kl_check, loss_check
from routesae.selftest.cli import selftest

STAGES = ("harvest", "fit", "eval", "contexts", "steer", "circuit-data", "circuit")
CHECKS = ("harvest: first batch", "fit: loss goes down", "eval --splice: KL")


def _run(out: Path, *extra: str):
    return CliRunner().invoke(selftest, ["--device", "cpu", "--tiny", "--quiet", "--out", str(out), *extra],
                              catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest") / "out"
    result = _run(out)
    return result, json.loads(result.stdout), out


def test_cpu_tiny_mode_runs_every_stage_and_every_check_holds(tiny_run):
    result, report, out = tiny_run
    assert result.exit_code == 0, result.output
    assert report["ok"] is True
    assert list(report["stages"]) == list(STAGES)
    for name, stage in report["stages"].items():
        assert stage["ok"], (name, stage)
        assert stage["seconds"] > 0 and stage["peak_rss_bytes"] > 0
        assert stage["peak_gpu_bytes"] is None  # a CPU run
        assert stage["command"][:2] == ["routesae", name]
    for name in ("harvest", "fit", "eval", "contexts", "steer"):
        stage = report["stages"][name]
        assert stage["tokens"] > 0 and stage["tokens_per_s"] == pytest.approx(stage["tokens"] / stage["seconds"], 0.01)
    assert report["stages"]["harvest"]["tokens"] == report["sizes"]["tokens"]
    assert [c["name"][:len(p)] for c, p in zip(report["checks"], CHECKS)] == list(CHECKS)
    for check in report["checks"]:
        assert check["held"] is True and check["measured"] is not None and check["tolerance"] and check["why"]
    act, loss, kl = report["checks"]
    # float32 forward on this CPU: only the store's bf16 rounding (<= 2^-9 relative) is left
    assert 0 < act["measured"] <= 2 ** -9
    assert 0 < loss["measured"] < 1 and len(loss["detail"]["per_sae"]) == 5
    assert set(kl["detail"]["per_sae"]) == {"topk-k8-l3", "routesae-k8"}
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["peak_gpu_bytes"] is None and report["peak_rss_bytes"] > 0
    assert report["gpu_only"]["exercised"] is False and any("NCCL" in p for p in report["gpu_only"]["paths"])
    assert (out / "store.zarr").is_dir() and (out / "eval" / "per_context.npz").is_file()
    assert (out / "circuit" / "masks" / "circuit.json").is_file()


def test_a_perturbed_reference_fails_its_check_and_exits_1(tmp_path, monkeypatch):
    real = selftest_run.first_batch_hidden_states

    def perturbed(*args, **kwargs):  # 1% noise: a fault well below what any real mistake gives
        hidden = real(*args, **kwargs)
        gen = torch.Generator().manual_seed(0)
        return {layer: h + 0.01 * h.norm(dim=-1, keepdim=True) / math.sqrt(h.shape[-1])
                * torch.randn(h.shape, generator=gen) for layer, h in hidden.items()}

    monkeypatch.setattr(selftest_run, "first_batch_hidden_states", perturbed)
    result = _run(tmp_path / "out", "--tokens", "16384")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False
    act, loss, kl = report["checks"]
    assert act["held"] is False and act["measured"] > ACT_TOLERANCE["float32"]
    assert loss["held"] and kl["held"]  # only the perturbed comparison fails
    assert "FAILED: harvest: first batch's stored activations" in result.stderr


def test_an_unusable_out_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    from routesae.cli import _OneLineErrors

    res = CliRunner().invoke(_OneLineErrors(commands={"selftest": selftest}),
                             ["selftest", "--device", "cpu", "--tiny", "--out", str(tmp_path / "full")])
    assert res.exit_code == 1 and res.output.startswith("routesae: error: --out ") and res.output.count("\n") == 1


def test_help_imports_no_torch():
    code = ("import sys\nsys.argv = ['routesae', '--help']\nfrom routesae.selftest.cli import selftest\n"
            "try:\n    selftest()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--tiny" in done.stdout and done.stderr.strip().splitlines()[-1] == "False"


# --- the checks alone ---------------------------------------------------------------------------------
def test_activation_check_tells_rounding_from_a_fault():
    gen = torch.Generator().manual_seed(1)
    ref = {layer: torch.randn(4, 16, 32, generator=gen) * (layer + 1) for layer in (1, 2)}
    keep = torch.ones(4, 16, dtype=torch.bool)
    keep[:, 0] = False  # BOS: left out, whatever it holds
    rounded = {layer: h.bfloat16().float() for layer, h in ref.items()}
    rounded[1][:, 0] = 1e6
    held = activation_check(rounded, ref, keep, "float32")
    assert held.held and held.measured <= 2 ** -9
    shifted = {**rounded, 2: ref[2].roll(1, dims=0)}  # another context's activations in one layer
    bad = activation_check(shifted, ref, keep, "float32")
    assert not bad.held and bad.measured > 1 and bad.detail["per_layer"]["1"] <= 2 ** -9
    other_layer = {**rounded, 2: ref[1]}  # the wrong layer
    assert not activation_check(other_layer, ref, keep, "bfloat16").held
    noisy = {layer: h * (1 + 0.01 * torch.randn(h.shape, generator=gen)) for layer, h in ref.items()}
    assert not activation_check(noisy, ref, keep, "float32").held  # 1%: too much for a float32 forward
    assert activation_check(noisy, ref, keep, "bfloat16").held  # within a bf16 forward's drift


def test_kl_check():
    ref = {"topk": 0.50, "routesae": 0.30}
    assert kl_check({"topk": 0.5001, "routesae": 0.3}, ref, "float32").held
    assert not kl_check({"topk": 0.52, "routesae": 0.3}, ref, "float32").held  # 4% off in float32
    assert kl_check({"topk": 0.52, "routesae": 0.3}, ref, "bfloat16").held
    assert not kl_check({"topk": 0.60, "routesae": 0.3}, ref, "bfloat16").held  # 20% off
    missing = kl_check({"topk": 0.5}, ref, "float32")
    assert not missing.held and missing.measured == math.inf
    assert not kl_check({}, {}, "float32").held  # nothing compared holds nothing


def test_loss_check(tmp_path):
    def folder(name: str, nmse: list[float], penalty: float = 0.0) -> Path:
        (tmp_path / name).mkdir()
        rows = [{"step": i, "loss": x + penalty * i, "nmse": x} for i, x in enumerate(nmse)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    down, up, one = folder("down", [1.0, 0.8, 0.6]), folder("up", [0.5, 0.4, 0.7]), folder("one", [0.5])
    assert loss_check({"down": down}).held
    # a steered sparsity penalty makes the total rise while the reconstruction improves (JumpReLU)
    assert loss_check({"penalized": folder("penalized", [0.9, 0.7, 0.5], penalty=1.5)}).held
    check = loss_check({"down": down, "up": up})
    assert not check.held and check.measured == pytest.approx(1.4)
    assert not loss_check({"one": one}).held  # one line shows no trend
    assert not loss_check({"absent": tmp_path / "absent"}).held


def test_sizes_give_the_loss_check_enough_steps():
    from routesae.selftest.run import MIN_FIT_STEPS, SelftestConfig, plan_sizes

    assert plan_sizes(SelftestConfig(), cuda=True).tokens == 2_000_000
    assert plan_sizes(SelftestConfig(tiny=True), cuda=False)[:2] == (32_768, 64)
    for tokens in (4096, 16384, 32768):
        sizes = plan_sizes(SelftestConfig(tokens=tokens, context_len=64), cuda=False)
        assert int(tokens * 0.9) // sizes.fit_batch >= MIN_FIT_STEPS  # 4096 tokens once gave JumpReLU 6 steps
