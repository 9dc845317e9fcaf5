"""A fit checkpoints by elapsed time as well as by steps, says on Ctrl-C what it kept, shows the
running L0 of the coders whose L0 can drift, and says what --k takes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from routesae.cli import main
from routesae.train import trainer
from routesae.train.trainer import planned_steps
from synthetic_store import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "s.zarr"
    make_store(path, 2048, layers=[0, 1], chunk_contexts=4)
    return path


def fit(store, out, *extra):
    return CliRunner().invoke(main, ["fit", "--cache", str(store), "--out", str(out), "--arch", "topk", "--layer", "1",
                                     "--latents", "32", "--k", "4", "--batch-size", "64", "--buffer-tokens", "256",
                                     "--no-progress", *map(str, extra)])


@pytest.fixture(scope="module")
def total(store) -> int:
    """Steps of the fit above, from a whole run of it; planned_steps must count as many."""
    out = store.parent / "whole"
    assert fit(store, out).exit_code == 0
    training = json.loads((out / "config.json").read_text())["training"]
    epoch = round(training["tokens_seen"] / training["epochs_seen"])
    assert planned_steps(training["tokens_seen"], epoch, 64) == training["steps"]
    return training["steps"]


@pytest.fixture
def slow_steps(monkeypatch):
    """Each step takes 30 seconds of a fake clock (no sleeping); -> the steps checkpointed."""
    now = [1000.0]
    saved: list[int] = []
    real_step, real_save = trainer.Trainer.train_step, trainer.Trainer.save_checkpoint

    def train_step(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        now[0] += 30.0

    def save(self):
        real_save(self)
        saved.append(self.step)

    monkeypatch.setattr(trainer, "clock", lambda: now[0])
    monkeypatch.setattr(trainer.Trainer, "train_step", train_step)
    monkeypatch.setattr(trainer.Trainer, "save_checkpoint", save)
    return saved


def test_a_checkpoint_whenever_the_minutes_pass_before_the_steps(store, tmp_path, slow_steps):
    r = fit(store, tmp_path / "fit", "--checkpoint-every", 1000, "--checkpoint-minutes", 2)
    assert r.exit_code == 0, r.output
    steps = json.loads((tmp_path / "fit" / "config.json").read_text())["training"]["steps"]
    assert steps > 9
    # 2 minutes are 4 steps of 30 seconds; none at the last step (the outputs are written then)
    assert slow_steps == list(range(4, steps, 4))
    assert not (tmp_path / "fit" / "checkpoint.pt").exists()


def test_steps_still_checkpoint_when_they_come_first(store, tmp_path, slow_steps):
    r = fit(store, tmp_path / "fit", "--checkpoint-every", 3, "--checkpoint-minutes", 60)
    assert r.exit_code == 0, r.output
    steps = json.loads((tmp_path / "fit" / "config.json").read_text())["training"]["steps"]
    assert slow_steps == list(range(3, steps, 3))


def test_the_checkpoint_interval_in_minutes_may_change_on_resume_and_must_be_positive(store, tmp_path):
    from routesae.train.config import FitConfig

    assert "checkpoint_minutes" not in FitConfig(cache="c", out="o").result_fields()
    r = fit(store, tmp_path / "fit", "--checkpoint-minutes", 0)
    assert r.exit_code == 1 and "--checkpoint-minutes must be positive, got 0" in r.stderr


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C as the fit begins step `step` + 1."""
    real = trainer.Trainer.train_step

    def train_step(self, *args, **kwargs):
        if self.step == step:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "train_step", train_step)


def test_ctrl_c_after_a_checkpoint_by_time_names_it(store, total, tmp_path, slow_steps, monkeypatch):
    interrupt_at(monkeypatch, 6)
    out = tmp_path / "fit"
    r = fit(store, out, "--checkpoint-every", 1000, "--checkpoint-minutes", 2)
    assert r.exit_code == 130, r.output
    assert r.stderr.strip().splitlines()[-1] == (
        f"routesae: interrupted; fit stopped after step 6 of {total}; the checkpoint at step 4 is kept, rerun the same "
        "command to resume")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.undo()
    r = fit(store, out, "--checkpoint-every", 1000, "--checkpoint-minutes", 2)  # the real clock again
    assert r.exit_code == 0 and f"resuming {out} at step 4 (" in r.stderr, r.output


def test_ctrl_c_before_any_checkpoint_says_so_and_leaves_nothing(store, total, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 3)
    out = tmp_path / "fit"
    r = fit(store, out)
    assert r.exit_code == 130, r.output
    assert r.stderr.strip().splitlines()[-1] == (
        f"routesae: interrupted; fit stopped after step 3 of {total}, before the first checkpoint (every 500 steps or "
        "10 minutes); nothing is kept yet")
    assert not out.exists()


def test_planned_steps_count_each_epochs_short_last_batch():
    assert planned_steps(100, 100, 64) == 2
    assert planned_steps(250, 100, 64) == 2 * 2 + 1
    assert planned_steps(128, 128, 64) == 2


@pytest.mark.parametrize("arch, shown", [("jumprelu", True), ("topk", False)])
def test_the_bar_shows_the_running_l0_against_its_target(store, tmp_path, arch, shown):
    r = CliRunner().invoke(main, ["fit", "--cache", str(store), "--out", str(tmp_path / "fit"), "--arch", arch,
                                  "--layer", "1", "--latents", "32", "--k", "4", "--batch-size", "64",
                                  "--buffer-tokens", "256", "--progress"])
    assert r.exit_code == 0, r.output
    assert "training 1 SAE(s) on " in r.stderr and "a checkpoint every 500 steps or 10 minutes" in r.stderr
    assert bool(re.search(r"L0=\d+\.\d/4\b", r.stderr)) == shown, r.stderr


def test_a_bad_k_says_what_k_takes(store, tmp_path):
    r = fit(store, tmp_path / "fit", "--k", "abc")
    assert r.exit_code == 1
    assert r.stderr.strip() == ("routesae: error: --k must be a whole number or a comma-separated list such as 32,64; "
                                "got 'abc'"), r.stderr
