"""harvest says what it does before the model loads and as the loop starts, and its bar moves with
every forward batch, before the first shard is committed (a shard of a large model holds minutes of
forwards), the committed tokens beside it."""

from __future__ import annotations

import re

from tqdm.auto import tqdm

from routesae.harvest import run as harvest_run
from routesae.harvest.run import HarvestConfig, run_harvest


class EveryUpdate(tqdm):
    """A bar drawn at every update (the default waits 0.1 s between draws: a tiny run has few)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})


def test_the_bar_moves_per_batch_before_the_first_shard_commits(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harvest_run, "tqdm", EveryUpdate)
    # 4 shards of 512 tokens, each 4 batches of 4 contexts of 32
    run_harvest(HarvestConfig(out=str(tmp_path / "s.zarr"), model=str(tiny_llama_dir), dataset="builtin", tokens=2048,
                              layers="1,2", context_len=32, batch_size=4, shard_tokens=512, min_chunk_bytes=1024,
                              dtype="float32"))
    err = capsys.readouterr().err
    assert f"loading {tiny_llama_dir} (float32) ..." in err.splitlines()
    assert ("harvesting 2,048 tokens of layers 1-2 in batches of 4 contexts of 32; shards of 512 tokens are committed "
            "as they fill") in err.splitlines()
    states = []  # (tokens through the model, tokens committed) at each drawing of the bar
    for part in re.split(r"[\r\n]", err):
        m = re.match(r"harvest:.*?\| ([\d.]+k?)/[\d.]+k? .*committed=([\d,]+)\]", part.strip())
        if m:
            through = float(m.group(1).rstrip("k")) * (1000 if m.group(1).endswith("k") else 1)
            states.append((through, int(m.group(2).replace(",", ""))))
    assert (128, 0) in states, states  # the first batch shown, nothing committed yet
    assert len({t for t, _ in states}) >= 16, states  # a step per batch, not per shard
    assert abs(states[-1][0] - 2048) < 5 and states[-1][1] == 2048, states  # "2.05k" through, all committed
