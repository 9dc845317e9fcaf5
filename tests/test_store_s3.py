"""Stores on object storage, against a real S3-compatible server on 127.0.0.1 (moto's server mode):
harvest into a bucket, the objects byte for byte the files of the same harvest on disk; fit and
eval read it and give what they give from the local copy; a harvest killed mid-way resumes on S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from routesae import Cache
from routesae.cli import main
from routesae.harvest.run import HarvestConfig, run_harvest
from s3_server import make_bucket, s3_server

pytest.importorskip("s3fs")
pytest.importorskip("moto")

HARVEST = dict(dataset="builtin", tokens=4096, layers="all", context_len=32, batch_size=4, shard_tokens=512,
               min_chunk_bytes=1024, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server() as env:
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            make_bucket(env, "stores")
            yield env
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _objects(url: str) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    key = url.removeprefix("s3://")
    return {k[len(key) + 1 :]: fs.cat_file(k) for k in fs.find(key)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _routesae(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "routesae", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "sae.safetensors"))


def test_harvest_fit_eval_on_s3_match_a_local_store(s3, tiny_llama_dir, tmp_path):
    local, remote = tmp_path / "local.zarr", "s3://stores/runs/tiny.zarr"
    run_harvest(HarvestConfig(out=str(local), model=str(tiny_llama_dir), **HARVEST))
    cache = run_harvest(HarvestConfig(out=remote, model=str(tiny_llama_dir), **HARVEST))
    assert str(cache.path) == remote and cache.complete and cache.n_tokens == 4096
    assert _objects(remote) == _files(local)

    # a second harvest into a complete store is refused in one line, as on disk
    with pytest.raises(Exception, match="complete store"):
        run_harvest(HarvestConfig(out=remote, model=str(tiny_llama_dir), **HARVEST))

    info = CliRunner().invoke(main, ["info", remote])
    assert info.exit_code == 0 and "complete" in info.output, info.output

    fit_args = ["--arch", "topk,routesae", "--k", "8", "--latents", "64", "--batch-size", "128", "--tokens", "2048",
                "--layer", "3", "--routed-layers", "1-3", "--no-progress"]
    # in processes of their own, as a user runs them (the fit's loader process reads the bucket too)
    for name, store in (("local", str(local)), ("remote", remote)):
        _routesae("fit", "--cache", store, "--out", str(tmp_path / name), *fit_args)
    for arch in ("topk-k8", "routesae-k8"):
        a, b = _weights(tmp_path / "local" / arch), _weights(tmp_path / "remote" / arch)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    reports = {}
    for name, store in (("local", str(local)), ("remote", remote)):
        _routesae("eval", "--sae", str(tmp_path / name / "topk-k8"), "--cache", store, "--splice", "--quiet",
                  "--json", str(tmp_path / f"{name}.json"))
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    rows = [[{k: v for k, v in row.items() if isinstance(v, float)} for row in reports[n]["rows"]] for n in reports]
    assert rows[0] == rows[1] and rows[0]


SCRIPT = """
import sys
from routesae.harvest.run import HarvestConfig, run_harvest
run_harvest(HarvestConfig(out=sys.argv[2], model=sys.argv[1], dataset="builtin", tokens=32768, layers="all",
                          context_len=32, batch_size=4, shard_tokens=512, min_chunk_bytes=1024,
                          dtype="float32", device="cpu", progress=False))
"""


def test_a_harvest_killed_on_s3_resumes_to_the_same_objects(s3, tiny_llama_dir, tmp_path):
    local, remote = tmp_path / "local.zarr", "s3://stores/killed.zarr"
    assert subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llama_dir), str(local)]).returncode == 0
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_llama_dir), remote], stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if Cache.open(remote).n_tokens >= 2048:
                break
        except Exception:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Cache.open(remote)
    assert not partial.complete and 0 < partial.n_tokens < 32768
    resumed = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llama_dir), remote], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming s3://stores/killed.zarr" in resumed.stderr
    assert _objects(remote) == _files(local)
