"""A store on a loopback S3 server (moto) against the same store on local disk, side by side.

    python bench/store_s3.py [--tokens 16384] [--fit-tokens 16384] [--arch topk,routesae]

Harvests the offline SmolLM2 on the built-in corpus into a local folder and into a bucket of a
moto server started on 127.0.0.1 (checking the objects equal the files), then times `routesae fit`
from each (same arguments, same batches) and prints tokens/s and the ratios. The loopback server
keeps objects in its own memory and serves them over HTTP from a Python process: the ratio shows
what going through zarr's fsspec store costs (no memory mapping, ranged GETs per chunk), not what a
real bucket's network would.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import make_bucket, s3_server  # noqa: E402


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens to harvest")
    ap.add_argument("--fit-tokens", type=int, default=16384, help="training tokens per fit")
    ap.add_argument("--arch", default="topk,routesae")
    a = ap.parse_args()
    routesae = [sys.executable, "-m", "routesae"]
    with tempfile.TemporaryDirectory() as tmp, s3_server() as env:
        os.environ.update(env)
        make_bucket(env, "bench")
        local, remote = str(Path(tmp) / "store.zarr"), "s3://bench/store.zarr"
        harvest = ["harvest", "--model", "smollm2", "--dataset", "builtin", "--tokens", str(a.tokens), "--device", "cpu",
                   "--quiet"]
        t_h_local = _timed([*routesae, *harvest, "--out", local])
        t_h_remote = _timed([*routesae, *harvest, "--out", remote])
        import s3fs

        fs = s3fs.S3FileSystem(use_listings_cache=False)
        objects = {k.removeprefix("bench/store.zarr/"): fs.cat_file(k) for k in fs.find("bench/store.zarr")}
        files = {str(p.relative_to(local)): p.read_bytes() for p in Path(local).rglob("*") if p.is_file()}
        fit = ["fit", "--arch", a.arch, "--k", "32", "--tokens", str(a.fit_tokens), "--batch-size", "1024",
               "--eval-tokens", "0.1", "--no-progress"]
        t_f_local = _timed([*routesae, *fit, "--cache", local, "--out", str(Path(tmp) / "fit-local")])
        t_f_remote = _timed([*routesae, *fit, "--cache", remote, "--out", str(Path(tmp) / "fit-remote")])
    print(f"SmolLM2, built-in corpus, {a.tokens:,} tokens harvested; fit of {a.arch} k 32 on {a.fit_tokens:,} tokens "
          f"(wall clock, process start and model load included)")
    print(f"  harvest  local {t_h_local:6.1f} s   s3 {t_h_remote:6.1f} s   s3/local speed {t_h_local / t_h_remote:.2f}x  "
          f"objects equal files: {objects == files}")
    print(f"  fit      local {t_f_local:6.1f} s   s3 {t_f_remote:6.1f} s   s3/local speed {t_f_local / t_f_remote:.2f}x  "
          f"({a.fit_tokens / t_f_local:,.0f} vs {a.fit_tokens / t_f_remote:,.0f} tok/s)")


if __name__ == "__main__":
    main()
