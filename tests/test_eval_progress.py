"""eval says what it is doing as each phase starts, and its splice bar moves within a batch (one
batch of a large model's contexts takes minutes: the bar must not sit at 0% through it)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from tqdm.auto import tqdm

from routesae.cli import main
from routesae.evaluate import run as eval_run
from tiny_models import tiny_store_with_saes


class EveryUpdate(tqdm):
    """A bar drawn at every update (the default waits 0.1 s between draws: a tiny run has few)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalprogress")
    model_dir = tiny_store_with_saes(root, ["topk", "routesae"], tokens=2048)
    return root, model_dir


def splice_states(stderr: str) -> list[tuple[float, str]]:
    """(tokens done, what it said it was doing) of each drawing of the splice bar."""
    states = []
    for part in re.split(r"[\r\n]", stderr):
        m = re.match(r"eval \(splice\):.*?\| ([\d.]+)/\d+ \[(.*)\]$", part.strip())
        if m:
            timing_rate_doing = m.group(2).split(", ", 2)  # 00:00<00:00, 543tok/s, splicing topk-k8
            states.append((float(m.group(1)), timing_rate_doing[2] if len(timing_rate_doing) > 2 else ""))
    return states


def test_splice_bar_moves_within_a_batch_and_phases_are_announced(world, monkeypatch):
    root, model_dir = world
    monkeypatch.setattr(eval_run, "tqdm", EveryUpdate)
    # the held-out tail (a quarter of 2,048 tokens: 16 contexts of 32) in one batch
    r = CliRunner().invoke(main, ["eval", "--sae", str(root / "runs" / "topk-k8"), str(root / "runs" / "routesae-k8"),
                                  "--cache", str(root / "s.zarr"), "--splice", "--model", str(model_dir),
                                  "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    err = r.stderr
    lines = [line for line in err.splitlines() if line and not line.startswith(("eval (", "\r"))]
    assert f"loading {model_dir} to splice into ..." in lines
    assert any(line.startswith("scoring 4 rows (topk-k8, routesae-k8, routesae-k8 [uniform], routesae-k8 "
                               "[random-layer]) on 512 store tokens") for line in lines), lines
    assert any(line.startswith("splicing 4 rows (") and line.endswith("16 contexts in batches of 16 ...")
               for line in lines), lines
    states = splice_states(err)
    within = sorted({n for n, _ in states if 0 < n < 512})
    assert len(within) >= 5, states  # one batch, yet the bar stood at several points inside it
    doing = {d for _, d in states}
    assert {"splicing topk-k8", "splicing routesae-k8 [uniform]", "KL and CE"} <= doing, doing
    assert states[-1][0] == 512
