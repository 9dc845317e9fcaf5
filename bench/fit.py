"""Throughput of `routesae fit` against its baselines, side by side in one run (not a test).

    python bench/fit.py                      # harvests a store from the offline SmolLM2 first
    python bench/fit.py --store demo.zarr    # or uses one (layers 7..22 of SmolLM2-135M)

For TopK on one layer (22) and RouteSAE on the 16 routed layers (7..22) by default (--arch adds
batchtopk, matryoshka, vanilla, gated, jumprelu on layer 22, mlsae and crosscoder on 7..22), d_model 576, 8x
latents, k 32, batches of 4096 tokens, it measures tokens/s of:
  zarr   `fit` reading the Zarr store (its default loader, --loader to pick another; shuffle buffer);
  ram    the same trainer fed from a tensor already in RAM (shuffled once, batches are views);
  dense  a plain dense PyTorch step of the same architecture (bf16 autocast encode, its activation
         on the dense pre-activations, dense decode, its loss, Adam); RouteSAE's router in plain
         PyTorch too. Target: 1.5x for the TopK-like coders (their sparse kernel), 1.0x for the
         coders without a k (vanilla, gated, jumprelu; their steps are sparse too once few
         pre-activations pass their thresholds: sparse_threshold.py);
  llm    on-the-fly training that reruns the LLM for every batch, as the authors' code does
         (full forward with output_hidden_states, then the same trainer's step),
each in a fresh subprocess so its peak RSS is its own, and prints the ratios. Every variant runs
--rounds times, interleaved with the others, and its best run counts: on a shared machine other
jobs disturb runs unevenly, and the best run is the least disturbed (all runs are printed too).
Beside best-of, the median over rounds of each round's own ratio.
It also times the sparse decode choices (forward + backward) the trainer picked from, and with
jumprelu in --arch, JumpReLU's sparse and dense steps by candidate share (where the coder switches).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

K, EXPANSION, BATCH = 32, 8, 4096


# --- children: one measurement each ----------------------------------------------------------------


def fit_config(store: str, arch: str, out: str, steps: int, loader: str = "auto"):
    """A fit of steps + 1 batches (the first, which waits for the first buffer, is not timed)."""
    from routesae.train.config import FitConfig

    return FitConfig(cache=store, out=out, archs=[arch], ks=[K], expansion=EXPANSION, batch_size=BATCH,
                     tokens=(steps + 1) * BATCH, log_every=10_000, checkpoint_every=10_000, progress=False,
                     loader=loader)


def ram_source(store: str, arch: str):
    """All training tokens of the fit's layers in RAM, shuffled once (not timed)."""
    from routesae.train.data import ChunkLoader, TensorLoader
    from routesae.train.trainer import plan_fit

    plan = plan_fit(fit_config(store, arch, "unused", 1))
    loader = ChunkLoader(plan.cache, plan.read_layers, plan.split, BATCH, 1 << 30, seed=0)
    acts = loader.load_buffer(0, 0, np.arange(plan.split.n_chunks))
    return TensorLoader(acts, plan.read_layers, BATCH, seed=0), plan


def child_fit(store: str, arch: str, mode: str, steps: int, loader: str) -> dict:
    from routesae.train.trainer import fit

    source = None
    if mode == "ram":
        source, _ = ram_source(store, arch)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(fit_config(store, arch, str(Path(tmp) / "run"), steps, loader), source=source)
    return {"tokens_per_s": result.steady_tokens_per_s, "tokens": result.tokens, "seconds": result.seconds}


class TextbookJumpReLU(torch.autograd.Function):
    """The dense baseline's JumpReLU, as SAELens and dictionary_learning write it: f = pre * 1[pre > theta];
    gradient to pre through the mask, to theta -theta * K((pre - theta) / eps) / eps summed over tokens."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        kernel = ((pre - theta).abs() < ctx.eps / 2).to(pre.dtype) / ctx.eps
        return grad * (pre > theta), -(theta * kernel * grad).sum(0), None


class TextbookStep(torch.autograd.Function):
    """The dense baseline's L0 step 1[pre > theta]: gradient to theta only, -K((pre - theta) / eps) / eps."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        kernel = ((pre - theta).abs() < ctx.eps / 2).to(pre.dtype) / ctx.eps
        return None, -(kernel * grad).sum(0), None


def dense_step_fn(arch: str, plan):
    """The baseline: a textbook dense step of the same architecture in plain PyTorch (bf16 autocast
    where the trainer uses bf16): dense encode, the architecture's activation on the dense
    [n, n_latents] pre-activations, dense decode, its loss, Adam; JumpReLU's activation and L0 are
    the textbook pair of autograd functions above."""
    from routesae.train.coders.jumprelu import BANDWIDTH
    from routesae.train.coders.matryoshka import default_prefixes

    d = plan.cache.d_model
    m = EXPANSION * d
    n_layers = len(plan.read_layers)
    width = n_layers * d if arch == "crosscoder" else d
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, width, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    params = {"W_enc": W.clone(), "b_enc": torch.zeros(m), "W_dec": W.clone(), "b_dec": torch.zeros(width)}
    if arch == "routesae":
        params["router"] = torch.empty(n_layers, d).uniform_(-d**-0.5, d**-0.5, generator=g)
    if arch == "gated":
        params.update(b_mag=torch.zeros(m), r_mag=torch.zeros(m))
    if arch == "jumprelu":
        params["threshold"] = torch.full((m,), 0.5)
    params = {k: torch.nn.Parameter(v) for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=5e-4, fused=True)
    dtype = plan.compute_dtype
    coef = 1.0

    def step(acts: torch.Tensor) -> None:
        x = acts.float()
        x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, correction=0) + 1e-6)
        if arch == "routesae":
            probs = torch.softmax(x.sum(1) @ params["router"].T, -1)
            p, i = probs.max(-1)
            x = p[:, None] * x[torch.arange(x.shape[0]), i]
        elif arch == "mlsae":
            x = x.reshape(-1, d)
        elif arch == "crosscoder":
            x = x.reshape(x.shape[0], -1)
        else:
            x = x[:, 0]
        penalty = 0.0
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            pre = (x - params["b_dec"]) @ params["W_enc"].T
            if arch == "gated":
                gate, mag = pre + params["b_enc"], pre * params["r_mag"].exp() + params["b_mag"]
                z = (gate > 0) * mag.relu()
                via_gate = gate.relu() @ params["W_dec"].detach() + params["b_dec"].detach()
                penalty = coef * gate.relu().sum(-1).mean() + (x - via_gate.float()).pow(2).sum(-1).mean()
            else:
                pre = pre + params["b_enc"]
                if arch == "vanilla":
                    z = pre.relu()
                    penalty = coef * (z @ params["W_dec"].norm(dim=1)).mean()
                elif arch == "jumprelu":
                    z = TextbookJumpReLU.apply(pre.float(), params["threshold"], BANDWIDTH)
                    penalty = coef * TextbookStep.apply(pre.float(), params["threshold"], BANDWIDTH).sum(-1).mean()
                elif arch in ("batchtopk", "matryoshka"):
                    vals, flat = pre.reshape(-1).topk(K * pre.shape[0])
                    z = torch.zeros_like(pre).reshape(-1).scatter(0, flat, vals.relu()).view_as(pre)
                    if arch == "matryoshka":  # every nested dictionary reconstructs on its own
                        for end in default_prefixes(m):
                            part = z[:, :end] @ params["W_dec"][:end] + params["b_dec"]
                            penalty = penalty + (part.float() - x).pow(2).sum(-1).mean()
                else:
                    vals, idx = pre.topk(K, dim=-1)
                    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
            x_hat = z @ params["W_dec"] + params["b_dec"]
        norm2 = x.pow(2).sum(-1)
        loss = ((x_hat.float() - x).pow(2).sum(-1) / norm2).mean() + penalty / norm2.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if arch != "vanilla":
            with torch.no_grad():
                params["W_dec"].div_(params["W_dec"].norm(dim=1, keepdim=True))

    return step


def child_dense(store: str, arch: str, steps: int) -> dict:
    source, plan = ram_source(store, arch)
    step = dense_step_fn(arch, plan)
    batches = source.batches()
    for _ in range(2):
        step(next(batches).acts)
    t = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        acts = next(batches).acts
        step(acts)
        tokens += acts.shape[0]
    return {"tokens_per_s": tokens / (time.perf_counter() - t), "tokens": tokens}


def child_llm(store: str, arch: str, steps: int) -> dict:
    """Rerun SmolLM2 for every batch (8 contexts of 512 tokens), then the trainer's own step."""
    from routesae import Cache
    from routesae.model.loading import load_model
    from routesae.train.data import Position
    from routesae.train.trainer import Trainer, plan_fit, size_budget

    cache = Cache.open(store)
    loaded = load_model(cache.model["id"], cache.model["dtype"], "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_fit(fit_config(store, arch, str(Path(tmp) / "run"), 1))

        class _NoSource:
            layers, epoch_tokens = plan.read_layers, plan.split.train_stop

            def batches(self, start=Position(0, 0)):
                raise RuntimeError("sizing reads only layers and epoch_tokens; it never draws batches")

        size_budget(plan, _NoSource())
        trainer = Trainer(plan, _NoSource())
        ctx = cache.context_len
        per_batch = max(1, BATCH // ctx)
        tokens, t = 0, None
        for i in range(steps + 1):
            start = i * per_batch * ctx
            ids = cache.token_ids(start, start + per_batch * ctx).view(per_batch, ctx)
            keep = ~cache.special(start, start + per_batch * ctx)
            with torch.no_grad():
                hidden = loaded.model(ids, output_hidden_states=True).hidden_states
            acts = torch.stack([hidden[layer].reshape(-1, cache.d_model) for layer in plan.read_layers], 1)[keep]
            trainer.train_step(acts)
            if i == 0:  # the first batch warms up
                t = time.perf_counter()
            else:
                tokens += acts.shape[0]
    return {"tokens_per_s": tokens / (time.perf_counter() - t), "tokens": tokens}


def child_decode() -> dict:
    """Forward + backward of the sparse decode at the bench's shape, by implementation."""
    import torch.nn.functional as F

    from routesae.train.sparse_ops import TransposedPattern, sampled_rowdot, sparse_decode

    n, d, m = BATCH, 576, EXPANSION * 576
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, d, generator=g) / d**0.5
    pre = torch.randn(n, m, generator=g)
    vals, idx = pre.topk(K, dim=1, sorted=False)
    grad = torch.randn(n, d, generator=g)

    def csr():  # the trainer's: CSR x dense forward, sampled dot + transposed CSR backward
        out = sparse_decode(vals, idx, W)
        sampled_rowdot(idx, grad, W)
        TransposedPattern.of(idx, m).matmul(vals, grad)
        return out

    def embedding_bag(dtype):
        Wt = W.to(dtype).requires_grad_()
        v = vals.to(dtype).requires_grad_()

        def run():
            out = F.embedding_bag(idx, Wt, per_sample_weights=v, mode="sum")
            out.backward(grad.to(dtype))
            return out

        return run

    def dense(dtype):
        Wt = W.to(dtype).requires_grad_()

        def run():
            z = torch.zeros(n, m, dtype=dtype).scatter(1, idx, vals.to(dtype)).requires_grad_()
            out = z @ Wt
            out.backward(grad.to(dtype))
            return out

        return run

    def timed(fn, reps=5):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3

    return {
        "csr fp32 (trainer)": timed(csr),
        "embedding_bag fp32": timed(embedding_bag(torch.float32)),
        "embedding_bag bf16": timed(embedding_bag(torch.bfloat16)),
        "dense scatter+matmul fp32": timed(dense(torch.float32)),
        "dense scatter+matmul bf16": timed(dense(torch.bfloat16)),
    }


def child_jumprelu_steps() -> dict:
    """JumpReLU's coder step (forward + backward, bf16) at the bench's shape, sparse and dense, by the
    share of pre-activations that are candidates (what `sparse_threshold.SPARSE_UP_TO` cuts at)."""
    from routesae.train import sparse_threshold
    from routesae.train.coders.jumprelu import JumpReLUCoder
    from routesae.train.sparse_threshold import candidate_mask

    n, d, m = BATCH, 576, EXPANSION * 576
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
    coder = JumpReLUCoder(d, m, k=K, generator=torch.Generator().manual_seed(0))
    coder.train()
    coder.started.fill_(True)
    with torch.no_grad():
        product = x @ coder.W_enc.T
    rows, default = {}, sparse_threshold.SPARSE_UP_TO
    for share in (0.01, 0.02, 0.04, 0.06, 0.08, 0.12):
        with torch.no_grad():  # thresholds where about `share` of the entries are candidates
            coder.threshold.copy_(torch.quantile(product[:1024], 1 - share, dim=0) + coder.bandwidth / 2)
            floor = coder.threshold - coder.bandwidth / 2
            got = float(candidate_mask(product.bfloat16(), coder.b_enc, floor).float().mean())
        ms = {}
        for mode, cut in (("sparse", 1.0), ("dense", 0.0)):
            sparse_threshold.SPARSE_UP_TO = cut
            times = []
            for _ in range(4):
                t = time.perf_counter()
                out = coder.forward_train(x, torch.bfloat16, sparsity_coef=1.0)
                ((out.x_hat - x).pow(2).sum(-1).mean() + out.penalty).backward()
                coder.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t)
            ms[mode] = min(times[1:]) * 1e3
        rows[f"{got:.3f}"] = ms
    sparse_threshold.SPARSE_UP_TO = default
    return {"steps_ms": rows, "sparse_up_to": default}


def run_child(args: argparse.Namespace) -> None:
    from routesae.cpu_memory import keep_freed_memory

    keep_freed_memory()  # what fit does on CPU; every variant gets it
    if args.child == "decode":
        out = child_decode()
    elif args.child == "jumprelu_steps":
        out = child_jumprelu_steps()
    elif args.child in ("zarr", "ram"):
        out = child_fit(args.store, args.arch, args.child, args.steps, args.loader)
    elif args.child == "dense":
        out = child_dense(args.store, args.arch, args.steps)
    else:
        out = child_llm(args.store, args.arch, args.llm_steps)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


# --- the parent: harvest if needed, run the children, print ---------------------------------------


def harvest(path: Path, tokens: int) -> None:
    from routesae.harvest.run import HarvestConfig, run_harvest

    print(f"harvesting {tokens:,} tokens of the built-in corpus through the offline SmolLM2 into {path} ...", flush=True)
    run_harvest(HarvestConfig(out=str(path), model="smollm2", dataset="builtin", tokens=tokens, device="cpu"))


def measure(args: argparse.Namespace, mode: str, arch: str = "topk") -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--arch", arch, "--store", str(args.store),
           "--steps", str(args.steps), "--llm-steps", str(args.llm_steps), "--loader", args.loader]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{mode}/{arch} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="store of SmolLM2 layers 7..22 (default: harvest one)")
    ap.add_argument("--harvest-tokens", type=int, default=131_072)
    ap.add_argument("--steps", type=int, default=96, help="timed steps of each run (the loader reads a buffer "
                    "every 16; fewer than ~64 times mostly the start, while the second buffer is read)")
    ap.add_argument("--llm-steps", type=int, default=2, help="timed batches of the on-the-fly baseline")
    ap.add_argument("--rounds", type=int, default=2, help="runs of every variant, interleaved; the best is kept "
                    "(the machine may be shared: the best run is the least disturbed)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of every run (default: torch's own)")
    ap.add_argument("--arch", default="topk,routesae", help="architectures, e.g. topk,routesae,batchtopk,vanilla,"
                    "gated,jumprelu,mlsae,crosscoder")
    ap.add_argument("--modes", default="zarr,ram,dense,llm", help="what to measure: zarr (the fit), ram, dense, llm")
    ap.add_argument("--loader", default="auto", help="fit's loader for the zarr runs: auto (mapped here), "
                    "mapped, process or thread")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.store = str(args.store)
        return run_child(args)

    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory()
        args.store = Path(tmp.name) / "bench.zarr"
        harvest(args.store, args.harvest_tokens)
    from routesae import Cache

    cache = Cache.open(args.store, require_complete=True)
    print(f"store {args.store}: {cache.n_tokens:,} tokens, layers {cache.layers[0]}..{cache.layers[-1]}, "
          f"d_model {cache.d_model}, {cache.layout.compression}; torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"k {K}, {EXPANSION}x latents, batches of {BATCH} tokens\n")

    decode = measure(args, "decode")
    print("sparse decode, forward + backward, ms per batch:")
    for name, ms in decode.items():
        if name != "peak_rss_mib":
            print(f"  {name:28s} {ms:8.1f}")
    print()

    modes = tuple(args.modes.split(","))
    archs = args.arch.split(",")
    steps = None
    if "jumprelu" in archs:
        steps = measure(args, "jumprelu_steps")
        print(f"jumprelu's coder step, forward + backward, ms per batch, by candidate share "
              f"(sparse up to {steps['sparse_up_to']:.4f}):")
        for share, ms in steps["steps_ms"].items():
            print(f"  {share:>6s}   sparse {ms['sparse']:7.1f}   dense {ms['dense']:7.1f}   "
                  f"dense/sparse {ms['dense'] / ms['sparse']:5.2f}x")
        print()
    runs: dict[tuple[str, str], list[dict]] = {(a, m): [] for a in archs for m in modes}
    for r in range(args.rounds):
        for arch in archs:
            for mode in modes:
                runs[arch, mode].append(measure(args, mode, arch))
        print(f"round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.2f})", flush=True)
    print()
    rows = []
    for arch in archs:
        from routesae.train.saes import ARCHITECTURES

        # the targets: 1.5x for the TopK-like coders, 1.0x for the coders without a k
        targets = {"zarr/ram": 0.9, "zarr/dense": 1.5 if ARCHITECTURES[arch].coder_class().fixed_l0 else 1.0,
                   "zarr/llm": 5.0}
        best = {m: max(runs[arch, m], key=lambda r: r["tokens_per_s"]) for m in modes}
        print(f"{arch}: tokens/s, best of {args.rounds} (all runs) [peak RSS MiB]")
        for mode in modes:
            every = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs[arch, mode])
            print(f"  {mode:6s} {best[mode]['tokens_per_s']:10,.0f}   ({every})   [{best[mode]['peak_rss_mib']:,.0f}]")
        z = best["zarr"]["tokens_per_s"]
        ratios = {f"zarr/{m}": z / best[m]["tokens_per_s"] for m in modes if m != "zarr"}
        # the same ratio within each round (runs next to each other in time), median over rounds:
        # the machine's speed drifts between minutes, and this is less exposed to it than best-of
        paired = {name: float(np.median([z_run["tokens_per_s"] / other["tokens_per_s"]
                                         for z_run, other in zip(runs[arch, "zarr"], runs[arch, name.split("/")[1]])]))
                  for name in ratios}
        for name, value in ratios.items():
            verdict = "ok" if value >= targets[name] else "BELOW TARGET"
            print(f"  {name:11s} {value:6.2f}x best-of, {paired[name]:5.2f}x paired median   "
                  f"(target >= {targets[name]}x: {verdict})")
        print()
        rows.append({"arch": arch, "runs": {m: runs[arch, m] for m in modes}, "ratios": ratios, "paired": paired})
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(json.dumps({"decode_ms": decode, "jumprelu_steps": steps, "results": rows}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
