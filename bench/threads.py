"""Two harvests side by side on one machine: PyTorch's threads against the cores they share.

    python bench/threads.py [--tokens 32768] [--model smollm2] [--rounds 1]

Runs `routesae harvest` (built-in corpus, CPU) in four ways, each --rounds times, and prints the
wall-clock tokens/s of every job (process start and model load included, as a user sees them):
  alone           one harvest, threads as routesae chooses them (the cores it may use)
  2 x all cores   two at once, each with --threads = every core (what PyTorch's default gave
                  before routesae chose: each job sized its pool for the whole machine)
  2 x --threads   two at once, each with --threads = cores / 2
  2 x pinned      two at once, each pinned by taskset to half the cores, threads left to
                  routesae (it reads the affinity: cores / 2 each)
and the ratios of the side-by-side runs' combined throughput to the lone run's.
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


def _start(model: str, out: Path, tokens: int, threads: int | None, cores: set[int] | None) -> subprocess.Popen:
    args = [sys.executable, "-m", "routesae", "harvest", "--model", model, "--dataset", "builtin", "--tokens",
            str(tokens), "--device", "cpu", "--quiet", "--overwrite", "--out", str(out)]
    if threads is not None:
        args += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec)


def _run(model: str, root: Path, tokens: int, jobs: list[tuple[int | None, set[int] | None]]) -> list[float]:
    t0 = time.perf_counter()
    procs = [_start(model, root / f"job{i}.zarr", tokens, t, c) for i, (t, c) in enumerate(jobs)]
    ended: dict[int, float] = {}
    while len(ended) < len(procs):  # each job's own end, whichever finishes first
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                if p.returncode != 0:
                    raise SystemExit(f"a harvest failed ({p.args})")
                ended[i] = time.perf_counter() - t0
        time.sleep(0.05)
    return [tokens / ended[i] for i in range(len(procs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs at least two cores")
    half = len(cores) // 2
    ways = {
        "alone": [(None, None)],
        "2 x all cores": [(len(cores), None), (len(cores), None)],
        "2 x --threads": [(half, None), (half, None)],
        "2 x pinned": [(None, set(cores[:half])), (None, set(cores[half:2 * half]))],
    }
    results: dict[str, list[list[float]]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            for way, jobs in ways.items():
                results[way].append(_run(a.model, Path(tmp), a.tokens, jobs))
    print(f"{len(cores)} cores, {a.tokens:,} tokens per harvest, {a.model}, {a.rounds} round(s); tokens/s of each job")
    alone = statistics.median(r[0] for r in results["alone"])
    for way, runs in results.items():
        per_job = [statistics.median(r[j] for r in runs) for j in range(len(runs[0]))]
        total = sum(per_job)
        print(f"  {way:14s} " + "  ".join(f"{x:8.0f}" for x in per_job) +
              f"   combined {total:8.0f}  = {total / alone:.2f}x the lone harvest")


if __name__ == "__main__":
    main()
