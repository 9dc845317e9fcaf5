"""Several SAEs on several ranks: data-parallel (every rank trains every SAE on its slice of each
batch) against one SAE per rank (each rank trains its SAE on whole batches), side by side in one
run (not a test).

    python bench/fit_ranks.py                      # a synthetic bf16 store (d_model 576), written first
    python bench/fit_ranks.py --store demo.zarr    # or a harvested one (its 3/4-depth layer)

For `--arch topk --k 32,64` (8x latents, batches of 4,096 tokens) it times, each in fresh processes:
  one     one process trains both SAEs (all the machine's threads): today's fit;
  ddp     `torchrun --nproc-per-node N -m routesae fit`: every rank trains both SAEs on its slice;
  spread  N single-process fits at once, one per k, one thread each: what handing each rank whole
          SAEs would cost (its ranks would not talk at all; the joint checkpoint is left out here).
It prints tokens/s of the group of SAEs (spread: the slowest fit's, since the group is done when
its last SAE is) from each fit's own steady-state figure (the first step, which waits for the first
buffer, excluded), and wall seconds, start-up included. Every variant runs --rounds times,
interleaved, and its best run counts (other jobs disturb runs unevenly).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXPANSION, BATCH = 8, 4096
RATE = re.compile(r"\(([\d,]+) tokens/s\)")


def synthetic_store(path: Path, tokens: int, d_model: int) -> None:
    """A complete bf16 store of Gaussian activations on one layer (6 of an 8-layer model), uncompressed
    as harvest writes by default."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from synthetic_store import make_store

    make_store(path, tokens, d_model=d_model, layers=[6], n_model_layers=8, context_len=512, chunk_contexts=2,
               shard_chunks=16, storage_dtype="bfloat16", compression="none")


def fit_args(store: str, out: str, ks: list[int], steps: int) -> list[str]:
    return ["fit", "--cache", store, "--out", out, "--arch", "topk", "--k", ",".join(map(str, ks)),
            "--expansion", str(EXPANSION), "--batch-size", str(BATCH), "--tokens", str((steps + 1) * BATCH),
            "--log-every", "10000", "--checkpoint-every", "10000", "--no-progress"]


def timed(cmds: list[list[str]], envs: list[dict[str, str]]) -> tuple[float, float]:
    """Run the commands at once -> (the slowest one's steady tokens/s, wall seconds of them all)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c, e in zip(cmds, envs)]
    rates = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a fit failed:\n{err[-3000:]}")
        found = RATE.findall(err)
        if not found:
            raise SystemExit(f"no throughput line in:\n{err[-3000:]}")
        rates.append(float(found[-1].replace(",", "")))
    return min(rates), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="a harvested store (default: a synthetic one)")
    ap.add_argument("--ks", default="32,64")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per fit")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=576, help="of the synthetic store")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if len(ks) != args.ranks:
        raise SystemExit("spread gives each rank one SAE: give as many --ks as --ranks")
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="fit-ranks-") as tmp:
        tmp_path = Path(tmp)
        store = args.store
        if store is None:
            store = str(tmp_path / "store.zarr")
            synthetic_store(Path(store), (args.steps + 2) * BATCH * 2, args.d_model)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = [sys.executable, "-m", "routesae"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(args.ranks), "-m", "routesae"]
        variants = {
            "one": lambda out: ([run + fit_args(store, out, ks, args.steps)], [env]),
            "ddp": lambda out: ([torchrun + fit_args(store, out, ks, args.steps)], [one_thread]),
            "spread": lambda out: ([run + fit_args(store, f"{out}-k{k}", [k], args.steps) for k in ks],
                                   [one_thread] * len(ks)),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, make in variants.items():
                cmds, envs = make(str(tmp_path / f"{name}-{r}"))
                results[name].append(timed(cmds, envs))
                rate, wall = results[name][-1]
                print(f"round {r + 1} {name:7s} {rate:10,.0f} tokens/s  {wall:6.1f} s", flush=True)
    best = {name: max(runs) for name, runs in results.items()}
    print(f"\ntopk k {args.ks}, {EXPANSION}x latents, batch {BATCH}, {args.steps} steps, {threads} cores, "
          f"{args.ranks} ranks; best of {args.rounds}:")
    for name, (rate, wall) in best.items():
        print(f"  {name:7s} {rate:10,.0f} tokens/s   {rate / best['one'][0]:5.2f}x one   "
              f"wall {min(w for _, w in results[name]):5.1f} s")
    print(f"  spread / ddp: {best['spread'][0] / best['ddp'][0]:.2f}x")


if __name__ == "__main__":
    main()
