"""A harvest killed with SIGKILL and started again ends bit-for-bit equal to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kill_points import SCRIPT as KILL_POINTS, start_paused
from routesae import Cache, RouteSAEError

SCRIPT = """
import sys
sys.path.insert(0, sys.argv[3])
import kill_points
kill_points.arm_from_env()
from routesae.harvest.run import HarvestConfig, run_harvest
run_harvest(HarvestConfig(out=sys.argv[2], model=sys.argv[1], dataset="builtin", tokens=49152, layers="all",
                          context_len=32, batch_size=4, shard_tokens=128, min_chunk_bytes=1024,
                          dtype="float32", progress=False))
"""


def _command(model_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", SCRIPT, str(model_dir), str(out), str(KILL_POINTS.parent)]


def _run(model_dir: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(_command(model_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _committed(out: Path) -> int:
    return json.loads((out / "zarr.json").read_text())["attributes"]["routesae"]["progress"]["tokens"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sigkill_then_resume_gives_identical_store(tiny_llama_dir, tmp_path):
    reference, interrupted = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    assert _run(tiny_llama_dir, reference).wait(timeout=300) == 0

    # killed once its writer has recorded a third shard, before committing it: two are committed
    proc = start_paused(_command(tiny_llama_dir, interrupted), "harvest-record:3", tmp_path / "markers",
                        dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _committed(interrupted) == 256

    # A reader mid-harvest sees only committed tokens, and the store says it is unfinished.
    partial = Cache.open(interrupted)
    assert not partial.complete and 0 < partial.n_tokens < 49152
    assert partial.token_ids().shape[0] == partial.n_tokens
    with pytest.raises(RouteSAEError, match="unfinished"):
        Cache.open(interrupted, require_complete=True)

    resumed = _run(tiny_llama_dir, interrupted)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    # one line says where it resumes
    said = [line for line in err.decode().splitlines() if line.startswith("resuming")]
    assert said == [f"resuming {interrupted}: {partial.n_tokens:,} of 49,152 tokens committed "
                    f"({partial.n_tokens // 128} shards), continuing from there"], err.decode()
    ref_files, got_files = _files(reference), _files(interrupted)
    assert ref_files.keys() == got_files.keys()
    assert [k for k in ref_files if ref_files[k] != got_files[k]] == []
    assert Cache.open(interrupted, require_complete=True).n_tokens == 49152
