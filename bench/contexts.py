"""Throughput of `routesae contexts`' streaming pass against the same SAE's plain encode over the
same stored tokens.

    python bench/contexts.py --cache demo/store.zarr --sae demo/runs/topk-k32 demo/runs/routesae-k32

Both sides read the same batches of whole contexts from the store (the SAE's layers only) and
encode their non-special tokens with `encode_sparse`; the contexts side also keeps every table
of the pass (counts, histograms, top-N with window suppression, the uniform sample, zero windows,
the paper rule). Printed per SAE: tokens/s of each and the ratio contexts / plain (the issue asks
for at least 0.8); then, apart, the time to assemble and write the output from the tables (once
per run, independent of the store's size). Runs alternate and the best of --repeats is kept,
since other processes share the CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def plain_pass(cache, sae, start: int, stop: int, step: int) -> None:
    from routesae.interpret.codes import sae_input

    layers = list(sae.config.layers)
    for a in range(start, stop, step):
        b = min(a + step, stop)
        keep = ~cache.special(a, b)
        cache.token_ids(a, b)
        acts = {layer: cache.acts(layer, a, b)[keep] for layer in layers}
        sae.encode_sparse(sae_input(sae, acts).to(sae.device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="the store")
    ap.add_argument("--sae", nargs="+", required=True, help="SAE folders (each timed alone)")
    ap.add_argument("--tokens", type=int, default=32768, help="store tokens to read (from the start, whole contexts)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from routesae.interpret.contexts import ContextsConfig, _finish, _SAEPass, _stream, load_vocab
    from routesae.model.loading import resolve_device
    from routesae.sae_folders import load_saes
    from routesae.store.zarr_store import Cache

    cache = Cache.open(args.cache)
    ctx = cache.context_len
    start, stop = 0, min(args.tokens, cache.n_tokens) // ctx * ctx
    device = resolve_device("auto")
    saes = load_saes(args.sae, device)
    cfg = ContextsConfig(saes=args.sae, cache=args.cache, out="", progress=False)
    vocab = load_vocab(cache, None)
    step = cfg.batch_contexts * ctx
    n = stop - start
    print(f"{n:,} tokens of {cache.path}, batches of {step} tokens, device {device}, {torch.get_num_threads()} threads")
    print("| SAE | plain tok/s | contexts tok/s | ratio | assemble + write (s) |")
    print("|---|---:|---:|---:|---:|")
    for s in saes:
        plain, ours = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plain_pass(cache, s.sae, start, stop, step)
            plain.append(time.perf_counter() - t0)
            p = _SAEPass(s, cfg, vocab, device)
            t0 = time.perf_counter()
            _stream(cache, [p], start, stop, cfg)
            ours.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            _finish(p, cache, vocab, Path(tmp), cfg, start, stop, n)
            write = time.perf_counter() - t0
        tp, tc = n / min(plain), n / min(ours)
        print(f"| {s.name} | {tp:,.0f} | {tc:,.0f} | {tc / tp:.2f} | {write:.1f} |", flush=True)


if __name__ == "__main__":
    main()
