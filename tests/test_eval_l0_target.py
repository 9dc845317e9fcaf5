"""eval warns, once per SAE, in the terminal and in the report, when an SAE's held-out L0 is far
from the L0 it was fitted for; never for the coders whose L0 is k by construction."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from routesae.cli import main
from synthetic_store import make_store


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("l0target")
    make_store(root / "s.zarr", 2048, layers=[0, 1], chunk_contexts=4)
    r = CliRunner().invoke(main, ["fit", "--cache", str(root / "s.zarr"), "--out", str(root / "runs"),
                                  "--arch", "topk,jumprelu", "--layer", "1", "--latents", "32", "--k", "4",
                                  "--batch-size", "64", "--buffer-tokens", "256", "--no-progress"])
    assert r.exit_code == 0, r.output
    return root


def evaluate(world, out):
    r = CliRunner().invoke(main, ["eval", "--sae", str(world / "runs" / "topk-k4"), str(world / "runs" / "jumprelu-k4"),
                                  "--cache", str(world / "s.zarr"), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return r, json.loads((out / "report.json").read_text())


def set_target(world, name: str, k: int) -> None:
    """Rewrite the k (the target L0) an SAE's config.json records, as if it had been fitted for k."""
    path = world / "runs" / name / "config.json"
    config = json.loads(path.read_text())
    config["k"] = k
    path.write_text(json.dumps(config))


def test_an_l0_far_from_its_target_is_said_once_in_the_terminal_and_the_report(world, tmp_path):
    _, first = evaluate(world, tmp_path / "first")
    l0 = {row["name"]: row["cache"]["l0"] for row in first["rows"]}
    # the JumpReLU as if fitted for an L0 three times what it has; the TopK as if for another k too
    target = max(2, round(3 * l0["jumprelu-k4"]))
    set_target(world, "jumprelu-k4", target)
    set_target(world, "topk-k4", 31)
    try:
        r, report = evaluate(world, tmp_path / "far")
    finally:
        set_target(world, "jumprelu-k4", 4)
        set_target(world, "topk-k4", 4)
    said = [line for line in r.stderr.splitlines() if line.startswith("routesae: warning:")]
    assert len(said) == 1, r.stderr
    off = (l0["jumprelu-k4"] - target) / target
    assert said[0].startswith(f"routesae: warning: jumprelu-k4: held-out L0 {l0['jumprelu-k4']:.1f} is far from its "
                              f"target {target} ({off:+.0%}, beyond ±25%)"), said
    warning = said[0].removeprefix("routesae: warning: ")
    assert report["warnings"] == [warning]
    assert f"- Warning: {warning}" in (tmp_path / "far" / "report.md").read_text()
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["jumprelu-k4"]["l0_target"] == target and rows["topk-k4"]["l0_target"] is None


def test_an_l0_near_its_target_is_not_warned_of(world, tmp_path):
    _, first = evaluate(world, tmp_path / "first")
    l0 = {row["name"]: row["cache"]["l0"] for row in first["rows"]}["jumprelu-k4"]
    near = max(2, round(l0))  # within half a latent of the measured L0
    set_target(world, "jumprelu-k4", near)
    try:
        r, report = evaluate(world, tmp_path / "near")
    finally:
        set_target(world, "jumprelu-k4", 4)
    assert abs(l0 - near) <= 0.25 * near and near >= 1
    assert "routesae: warning:" not in r.stderr and report["warnings"] == []
