"""int8 storage against bf16, side by side: bytes, reader throughput, and what a TopK SAE trained
from each gives on other text.

    python bench/int8.py [--tokens 65536] [--eval-tokens 16384] [--workdir bench-int8] [--k 32]

Harvests the offline SmolLM2 on the built-in corpus twice with the same settings (bf16, then
`--storage int8`) and an evaluation store of other text (`builtin:docstrings`, bf16); reuses them
when --workdir already holds them. Prints bytes per token per layer, the time to read every stored
layer of the same tokens from each store (Cache.acts_stored, tokens/s), then fits the same TopK SAE
(default layer, same batches) from each store and evaluates both on the evaluation store with
--splice: NormMSE, FVU and KL per token, with the int8/bf16 relative change (target: within 1%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from routesae import Cache


def _routesae(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "routesae", *args], check=True, stdout=subprocess.DEVNULL)


def _harvest(out: Path, tokens: int, dataset: str = "builtin", storage: str = "model") -> Cache:
    if not (out / "zarr.json").is_file() or not Cache.open(out).complete:
        _routesae("harvest", "--model", "smollm2", "--dataset", dataset, "--tokens", str(tokens), "--context-len", "512",
                  "--storage", storage, "--device", "cpu", "--quiet", "--overwrite", "--out", str(out))
    return Cache.open(out, require_complete=True)


def _read_rate(cache: Cache, tokens: int, rounds: int = 3) -> float:
    """Tokens/s of reading every stored layer of the first `tokens` tokens, block by block."""
    block = 4096
    out = torch.empty(block, cache.d_model, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for start in range(0, tokens, block):
            for layer in cache.layers:
                cache.acts_stored(layer, start, start + block, out=out)
        best = min(best, time.perf_counter() - t)
    return tokens / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--workdir", default="bench-int8")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(exist_ok=True)
    bf16 = _harvest(work / "bf16.zarr", a.tokens)
    int8 = _harvest(work / "int8.zarr", a.tokens, storage="int8")
    evals = _harvest(work / "eval.zarr", a.eval_tokens, dataset="builtin:docstrings")
    assert torch.equal(bf16.token_ids(), int8.token_ids())

    per = {name: c.nbytes_acts_on_disk() / (c.n_tokens * len(c.layers)) for name, c in (("bf16", bf16), ("int8", int8))}
    read_tokens = min(bf16.n_tokens, 16384)
    rate = {name: _read_rate(c, read_tokens) for name, c in (("bf16", bf16), ("int8", int8))}
    print(f"SmolLM2, {bf16.n_tokens:,} tokens x {len(bf16.layers)} layers, d_model {bf16.d_model}")
    print(f"  bytes per token per layer on disk: bf16 {per['bf16']:.1f}, int8 {per['int8']:.1f} "
          f"({per['int8'] / per['bf16']:.3f}x)")
    print(f"  read all layers ({read_tokens:,} tokens, best of 3): bf16 {rate['bf16']:,.0f} tok/s, int8 {rate['int8']:,.0f} "
          f"tok/s ({rate['int8'] / rate['bf16']:.2f}x)")

    rows = {}
    for name, store in (("bf16", bf16), ("int8", int8)):
        run = work / f"topk-{name}"
        _routesae("fit", "--cache", str(store.path), "--arch", "topk", "--k", str(a.k), "--batch-size", "1024",
                  "--epochs", str(a.epochs), "--no-progress", "--out", str(run))
        report = work / f"eval-{name}.json"
        _routesae("eval", "--sae", str(run), "--cache", str(evals.path), "--all-tokens", "--splice", "--quiet",
                  "--baselines", "none", "--json", str(report))
        rows[name] = json.loads(report.read_text())["rows"][0]
    print(f"  TopK k {a.k} fitted from each store ({a.epochs} epochs, same batches), evaluated on "
          f"{evals.n_tokens:,} tokens of other text with --splice:")
    for key in ("l0", "normmse", "fvu", "kl_per_token", "delta_ce"):
        x, y = _metric(rows["bf16"], key), _metric(rows["int8"], key)
        print(f"    {key:13s} bf16 {x:.5f}  int8 {y:.5f}  change {100 * (y - x) / x:+.2f}%")


def _metric(row: dict, key: str) -> float:
    """A metric of a report row (top level, or inside its splice results)."""
    if key in row and isinstance(row[key], (int, float)):
        return float(row[key])
    for part in row.values():
        if isinstance(part, dict) and isinstance(part.get(key), (int, float)):
            return float(part[key])
    raise KeyError(f"{key} not in the report row ({sorted(row)})")


if __name__ == "__main__":
    main()
