"""Several processes harvesting one store under torchrun: the store is byte for byte the one a
single process writes, also after all ranks are killed and the job is started again, with the same
or another number of ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import torch
import zarr

from kill_points import SCRIPT as KILL_POINTS, start_paused
from routesae import Cache
from routesae.store.zarr_store import SHARD_PROGRESS, StatsAccumulator, StoreLayout, StoreWriter

TOKENS = 131072  # 32 shards of 4,096 tokens: the tiny model's float32 rows make 1 MiB chunks of 4,096


def _args(model_dir: Path, out: Path) -> list[str]:
    return ["harvest", "--model", str(model_dir), "--dataset", "builtin", "--tokens", str(TOKENS), "--layers", "all",
            "--context-len", "32", "--batch-size", "4", "--shard-tokens", "4096", "--dtype", "float32",
            "--device", "cpu", "--quiet", "--out", str(out)]


def _start(model_dir: Path, out: Path, ranks: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "routesae", *_args(model_dir, out)]
    else:
        # --standalone: a rendezvous on a free local port, so concurrent jobs never collide
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "routesae", *_args(model_dir, out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _start_paused(model_dir: Path, out: Path, tmp_path: Path) -> subprocess.Popen:
    """Two ranks under kill_points; returns once each has recorded two shards of its own and waits
    (its writer before committing, its forward on the writer's full queue)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(KILL_POINTS), *_args(model_dir, out)]
    return start_paused(cmd, "harvest-record:2", tmp_path / "markers", {**os.environ, "OMP_NUM_THREADS": "1"},
                        processes=2, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each in a session of its own, so a group kill misses them)."""
    workers = psutil.Process(proc.pid).children(recursive=True)
    for p in [*workers, psutil.Process(proc.pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(workers, timeout=30)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err.decode()[:3000]
    return out.decode()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _recorded(out: Path) -> int:
    try:
        record = zarr.open_array(str(out / SHARD_PROGRESS / "record"), mode="r")
        return int((record[:, 0] >= 0).sum())
    except Exception:
        return 0


def _assert_same_store(reference: Path, got: Path) -> None:
    ref, new = _files(reference), _files(got)
    assert ref.keys() == new.keys()
    assert [k for k in ref if ref[k] != new[k]] == []


def test_two_ranks_write_the_single_process_store_byte_for_byte(tiny_llama_dir, tmp_path):
    single, double = tmp_path / "one.zarr", tmp_path / "two.zarr"
    procs = [_start(tiny_llama_dir, single, 1), _start(tiny_llama_dir, double, 2)]
    outputs = [_finish(p) for p in procs]
    # rank 0 alone reports
    assert outputs[1].count("wrote") == 1, outputs[1]
    _assert_same_store(single, double)
    cache = Cache.open(double, require_complete=True)
    assert cache.n_tokens == TOKENS and cache.layout.shard_tokens == 4096
    # both ranks wrote: shards alternate between them, and each record is its shard's own
    record = zarr.open_array(str(double / SHARD_PROGRESS / "record"), mode="r")[:]
    assert record[:, 0].tolist() == [4096 * (s + 1) for s in range(TOKENS // 4096)]
    meta = json.loads((double / "zarr.json").read_text())
    assert "consolidated_metadata" in meta  # written once complete

    # killed (every rank) part-way, then started again with 2 ranks and with 1: the same store
    for resume_ranks in (2, 1):
        killed = tmp_path / f"killed-{resume_ranks}.zarr"
        proc = _start_paused(tiny_llama_dir, killed, tmp_path)
        _kill_all(proc)
        partial = Cache.open(killed)
        assert not partial.complete and _recorded(killed) == 4
        _finish(_start(tiny_llama_dir, killed, resume_ranks))
        _assert_same_store(single, killed)


def test_readers_see_only_the_prefix_every_writer_has_filled(tmp_path):
    """Shards recorded out of order are committed only once the gap before them is filled."""
    layout = StoreLayout(chunk_tokens=8, shard_tokens=16)
    provenance = {"model": {"id": "x", "n_layers": 4}, "dataset": {"id": "d"}, "context_len": 8, "seed": 0}
    writer = StoreWriter.create(tmp_path / "s.zarr", provenance, [1, 2], 4, "float32", 48, layout)
    acts_of = np.random.default_rng(0).standard_normal((3, 2, 16, 4)).astype(np.float32)

    def write(shard: int) -> None:
        acts = acts_of[shard]
        ids = np.arange(16, dtype=np.int32)
        writer.write_shard(shard, acts, ids, ids % 8, np.zeros(16, bool))
        stats = StatsAccumulator([1, 2], 4)
        stats.add(torch.from_numpy(acts), torch.ones(16, dtype=torch.bool))
        writer.record_shard(shard, 16 * (shard + 1), {"doc": shard, "offset": 0}, stats.count, stats.packed())

    write(1)  # the second shard first: nothing is committed yet
    assert not writer.advance()
    assert Cache.open(tmp_path / "s.zarr").n_tokens == 0
    write(0)
    assert writer.advance()
    cache = Cache.open(tmp_path / "s.zarr")
    assert cache.n_tokens == 32 and cache.attrs["progress"]["resume"] == {"doc": 1, "offset": 0}
    first_two = acts_of[:2, 0].reshape(32, 4).astype(np.float64)  # layer 1 of shards 0 and 1
    assert cache.stats(1).count == 32
    np.testing.assert_allclose(cache.stats(1).mean.numpy(), first_two.mean(0), atol=1e-6)
    np.testing.assert_allclose(cache.stats(1).mean_sq_norm, (first_two ** 2).sum(1).mean(), rtol=1e-6)


def test_a_store_begun_before_the_shard_records_gets_them_on_resume(tmp_path):
    """An unfinished store written without shard_progress/ (routesae before it existed) resumes:
    opening it to write creates the records, and the committed prefix carries on from its own."""
    layout = StoreLayout(chunk_tokens=8, shard_tokens=16)
    provenance = {"model": {"id": "x", "n_layers": 4}, "dataset": {"id": "d"}, "context_len": 8, "seed": 0}
    path = tmp_path / "old.zarr"
    writer = StoreWriter.create(path, provenance, [1], 4, "float32", 32, layout)
    acts = np.ones((1, 16, 4), dtype=np.float32)
    ids = np.arange(16, dtype=np.int32)
    stats = StatsAccumulator([1], 4)
    stats.add(torch.from_numpy(acts), torch.ones(16, dtype=torch.bool))
    writer.write_shard(0, acts, ids, ids % 8, np.zeros(16, bool))
    writer.commit(16, {"doc": 3, "offset": 0}, stats.state())  # the old single-writer commit
    shutil.rmtree(path / SHARD_PROGRESS)

    resumed = StoreWriter.open(path)
    assert (path / SHARD_PROGRESS / "record" / "zarr.json").is_file()
    assert resumed.recorded_shards(1) == set()
    resumed.write_shard(1, 2 * acts, ids, ids % 8, np.zeros(16, bool))
    resumed.record_shard(1, 32, {"doc": 5, "offset": 0}, 16, np.concatenate(
        [np.full((1, 4), 32.0), np.full((1, 1), 16 * 16.0), np.full((1, 1), 16 * 4.0)], axis=1))
    assert resumed.advance()
    cache = Cache.open(path)
    assert cache.n_tokens == 32 and cache.stats(1).count == 32
    np.testing.assert_allclose(cache.stats(1).mean.numpy(), np.full(4, 1.5))  # mean of 16 ones and 16 twos
