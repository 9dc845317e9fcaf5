"""Harvest with N torchrun ranks against one process, same tokens, the threads split between ranks.

    python bench/harvest_ranks.py [--tokens 32768] [--ranks 2] [--threads 2] [--model smollm2]

Runs `routesae harvest` on the built-in corpus once as a single process with --threads threads and
once under `torchrun --nproc-per-node N` with threads/N threads per rank, alternately, --rounds
times, and prints wall-clock tokens/s of each (process start and model load included, as a user
sees them; the load time alone is printed too) and the ratio. Checks that both stores are byte for
byte the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _harvest(model: str, out: Path, tokens: int, ranks: int, threads: int) -> float:
    args = ["harvest", "--model", model, "--dataset", "builtin", "--tokens", str(tokens), "--device", "cpu",
            "--quiet", "--overwrite", "--out", str(out)]
    launcher = ([sys.executable, "-m", "routesae"] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                 "-m", "routesae"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    subprocess.run([*launcher, *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def _load_seconds(model: str, threads: int) -> float:
    code = ("import time, torch; t = time.perf_counter(); from routesae.model.loading import load_model; "
            f"load_model({model!r}, 'bfloat16', 'cpu'); print(time.perf_counter() - t)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return float(subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True).stdout)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    per_rank = max(1, a.threads // a.ranks)
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one.zarr", Path(tmp) / "many.zarr"
        t_one, t_many = [], []
        for _ in range(a.rounds):
            t_one.append(_harvest(a.model, one, a.tokens, 1, a.threads))
            t_many.append(_harvest(a.model, many, a.tokens, a.ranks, per_rank))
        same = _files(one) == _files(many)
        load = _load_seconds(a.model, a.threads)
    s_one, s_many = statistics.median(t_one), statistics.median(t_many)
    print(f"harvest {a.tokens:,} tokens of {a.model} on the built-in corpus, {a.threads} threads in all "
          f"(median of {a.rounds} rounds, wall clock including process start and model load, {load:.1f} s alone)")
    print(f"  1 process  x {a.threads} threads: {s_one:7.1f} s  {a.tokens / s_one:8,.0f} tok/s")
    print(f"  {a.ranks} ranks    x {per_rank} threads: {s_many:7.1f} s  {a.tokens / s_many:8,.0f} tok/s")
    print(f"  ratio ({a.ranks} ranks / 1 process, tok/s): {s_one / s_many:.2f}x; stores byte-identical: {same}")


if __name__ == "__main__":
    main()
