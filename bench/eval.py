"""Throughput of `routesae eval --splice` for one SAE against a plain forward of the same contexts.

    python bench/eval.py                                   # builds a small SmolLM2 store and a TopK SAE first
    python bench/eval.py --cache demo/store.zarr --sae demo/runs/topk-k64 --contexts 32

Both sides run the same contexts in batches of --batch-size: the plain side is `model(input_ids)`
(full logits, what any forward over the contexts costs); the eval side is the splice engine exactly
as `eval --splice` runs it (clean, spliced and zero-ablated runs, KL / CE over every non-special
position), once with --prefix auto (the default: clean runs start from the store's activations
once they prove bit-identical to the live forward) and once with --prefix live. Runs alternate and
the best of --repeats is kept, since other processes share the CPU. Prints tokens/s and the ratio
eval / plain (the issue asks for at least 0.8).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_fixture(folder: Path, tokens: int) -> tuple[str, str]:
    """A SmolLM2 store of the built-in corpus and a briefly trained TopK SAE at its default layer."""
    from routesae.harvest.run import HarvestConfig, run_harvest
    from routesae.train.config import FitConfig
    from routesae.train.trainer import fit

    store = folder / "store.zarr"
    print(f"building a {tokens}-token SmolLM2 store and a TopK SAE in {folder} ...", flush=True)
    run_harvest(HarvestConfig(out=str(store), model="smollm2", dataset="builtin", tokens=tokens, context_len=512,
                              batch_size=8, progress=False))
    fit(FitConfig(cache=str(store), out=str(folder / "topk"), archs=["topk"], ks=[64], tokens=8192, batch_size=4096,
                  eval_tokens=0.25, progress=False))
    return str(store), str(folder / "topk")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", help="store to read contexts from (default: build one)")
    ap.add_argument("--sae", help="SAE folder (default: build one)")
    ap.add_argument("--contexts", type=int, default=32, help="contexts to run (from the store's start)")
    ap.add_argument("--batch-size", type=int, default=8, help="contexts per forward (both sides)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from routesae.evaluate.run import load_saes, splice_metrics
    from routesae.evaluate.targets import Target
    from routesae.harvest.models import load_model
    from routesae.harvest.store import Cache

    tmp = None
    if not args.cache or not args.sae:
        tmp = tempfile.TemporaryDirectory(prefix="routesae-bench-eval-")
        args.cache, args.sae = build_fixture(Path(tmp.name), max(16384, args.contexts * 512))

    cache = Cache.open(args.cache)
    ctx = cache.context_len
    n_ctx = min(args.contexts, cache.n_tokens // ctx)
    start, stop = 0, n_ctx * ctx
    loaded = load_model(cache.model["id"], cache.model["dtype"], args.device)
    model = loaded.model
    device = next(model.parameters()).device
    (sae,) = load_saes([args.sae], device)
    target = Target(sae.name, sae.sae)
    ids = cache.token_ids(start, stop).view(-1, ctx)

    def plain() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, n_ctx, args.batch_size):
                logits = model(ids[lo : lo + args.batch_size].to(device)).logits
                del logits
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def splice(prefix: str):
        t = time.perf_counter()
        run = splice_metrics(model, cache, [target], start, stop, args.batch_size, prefix=prefix, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, run

    plain()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "auto": [], "live": []}
    runs = {}
    for _ in range(args.repeats):
        times["plain"].append(plain())
        for prefix in ("auto", "live"):
            dt, runs[prefix] = splice(prefix)
            times[prefix].append(dt)

    tokens = stop - start
    best = {k: min(v) for k, v in times.items()}
    print(f"\nmodel {cache.model['id']} ({cache.model['dtype']}, {device}), SAE {sae.name} "
          f"({sae.sae.config.arch}, layer(s) {sae.sae.config.layers}, k {sae.sae.config.k}, {sae.sae.config.n_latents} latents)")
    print(f"{n_ctx} contexts x {ctx} tokens = {tokens:,} tokens, batches of {args.batch_size}, "
          f"{torch.get_num_threads()} CPU threads, best of {args.repeats}")
    print(f"{'':28}{'seconds':>9}{'tokens/s':>10}{'ratio':>7}   (median s)")
    print(f"{'plain forward':28}{best['plain']:9.2f}{tokens / best['plain']:10.0f}{1.0:7.2f}   "
          f"({statistics.median(times['plain']):.2f})")
    for prefix in ("auto", "live"):
        r = runs[prefix]
        how = f"{r.batches['store']}/{r.batches['live'] + r.batches['store']} batches from store"
        print(f"{'eval --splice --prefix ' + prefix:28}{best[prefix]:9.2f}{tokens / best[prefix]:10.0f}"
              f"{best['plain'] / best[prefix]:7.2f}   ({statistics.median(times[prefix]):.2f}; {how})")
    same = runs["auto"].results[0].kl_per_token, runs["live"].results[0].kl_per_token
    print(f"KL/token: auto {same[0]:.6f}, live {same[1]:.6f}")
    print(f"ratio (eval --splice, default prefix auto, vs plain forward): {best['plain'] / best['auto']:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
