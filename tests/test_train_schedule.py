"""The learning-rate schedule: 5% linear warm-up, constant, linear decay to 0 over the last 20%."""

from __future__ import annotations

import json

import pytest

from routesae.train.config import FitConfig
from routesae.train.schedule import lr_factor
from routesae.train.trainer import fit
from synthetic_store import make_store


def test_schedule_shape():
    assert lr_factor(0.0) == 0.0
    assert lr_factor(0.025) == pytest.approx(0.5)
    assert lr_factor(0.05) == pytest.approx(1.0)
    assert lr_factor(0.5) == 1.0 and lr_factor(0.8) == 1.0
    assert lr_factor(0.9) == pytest.approx(0.5)
    assert lr_factor(0.95) == pytest.approx(0.25)  # the authors' code sits at 0 from 95%
    assert lr_factor(1.0) == 0.0
    assert lr_factor(0.81) == pytest.approx(0.95)  # no jump to 0.2 at 80%
    grid = [lr_factor(i / 1000) for i in range(1001)]
    assert all(b >= a for a, b in zip(grid[:50], grid[1:51]))
    assert all(b <= a for a, b in zip(grid[800:], grid[801:]))
    with pytest.raises(ValueError):
        lr_factor(0.5, warmup=0.9, decay=0.2)


def test_trainer_follows_the_schedule(tmp_path):
    make_store(tmp_path / "s.zarr", 4096, layers=[6])
    fit(FitConfig(cache=str(tmp_path / "s.zarr"), out=str(tmp_path / "r"), archs=["topk"], ks=[4], batch_size=100,
                  tokens=10_000, lr=1e-3, log_every=1, eval_tokens=0, progress=False))
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens"] == 10_000
    sizes = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + rows, rows)]
    assert set(sizes[:38]) == {100} and min(sizes) < 100  # an epoch of 3,840 tokens ends on a short batch
    before = 0
    for row, n in zip(rows, sizes):  # each step's lr is the schedule at the middle of its tokens
        assert row["lr"] == pytest.approx(1e-3 * lr_factor((before + n / 2) / 10_000))
        before += n
