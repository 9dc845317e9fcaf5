"""Time per mask-training step of `routesae circuit` against its floor: one forward + backward of
the model with the same SAEs spliced (every latent on, the gradient taken with respect to each
layer's code, so the backward runs through the whole spliced model as the masks' does).

    python bench/circuit.py --saes demo/circuit-saes/topk-k32-l8 demo/circuit-saes/topk-k32-l14 \\
        demo/circuit-saes/topk-k32-l20 [--task task.jsonl] [--batch 8 --seq 16]

The step is everything train_masks does per batch: soft masks from the logits at some beta, the
masked forward, the loss (|target - metric| + penalty), the backward and Adam's update. Printed:
ms per floor pass, ms per step and the ratio floor / step (the issue asks for at least 0.7). Runs
alternate and the best of --repeats is kept, since other processes share the CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--saes", nargs="+", default=sorted(glob.glob("demo/circuit-saes/topk-*")),
                    help="single-layer SAE folders of one model (default: demo/circuit-saes/*)")
    ap.add_argument("--task", default=None, help="a task file: its first train batch is timed (else random tokens)")
    ap.add_argument("--batch", type=int, default=8, help="prompt pairs per batch (random tokens)")
    ap.add_argument("--seq", type=int, default=16, help="tokens per prompt, BOS included (random tokens)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="load the model from here instead of the SAEs' recorded id")
    args = ap.parse_args()

    from routesae.circuits.masks import (
        MaskConfig,
        beta_at,
        init_logits,
        penalty,
        soft_masks,
    )
    from routesae.circuits.run_circuit import (
        TaskData,
        attach_means,
        read_records,
        tokenize_task,
    )
    from routesae.circuits.splice import CircuitModel, PairBatch
    from routesae.model.loading import load_store_model
    from routesae.model.special_tokens import SpecialTokens
    from routesae.train.load import load_sae

    if not args.saes:
        raise SystemExit("no SAEs: pass --saes")
    saes = [load_sae(p) for p in args.saes]
    loaded = load_store_model(Path(args.saes[0]), dict(saes[0].config.model), args.model, args.device, "bench")
    device = next(loaded.model.parameters()).device
    cm = CircuitModel(loaded.model, [s.to(device) for s in saes])
    bos = SpecialTokens.of(loaded.tokenizer).bos
    if args.task:
        data = tokenize_task(read_records(args.task), loaded.tokenizer, bos, args.batch)
    else:
        g = torch.Generator().manual_seed(0)
        vocab = int(loaded.info["vocab_size"])
        clean = torch.randint(100, vocab, (args.batch, args.seq), generator=g)
        clean[:, 0] = bos
        patch = clean.clone()
        patch[:, 1:3] = torch.randint(100, vocab, (args.batch, 2), generator=g)
        answers = torch.randint(100, vocab, (2, args.batch), generator=g)
        batch = PairBatch(clean, patch, answers[0], answers[1])
        data = TaskData([(batch, None)], [(batch, None)], args.seq - 1, {})
    data = attach_means(cm, data, args.batch)
    batch, mu = data.train[0]
    n_pos = data.n_pos

    with torch.no_grad():
        target = cm.metric(batch, mu).mean()
    cfg = MaskConfig(steps=100)
    logits = init_logits(cm, n_pos, cfg)
    opt = torch.optim.Adam(list(logits.values()), lr=cfg.lr)

    def floor() -> None:
        delta = {layer: torch.zeros(batch.clean.shape[0], batch.clean.shape[1] - 1, n, device=device,
                                    requires_grad=True) for layer, n in cm.n_latents.items()}
        cm.metric(batch, mu, delta=delta).mean().backward()

    step_no = [0]

    def step() -> None:
        masks = soft_masks(logits, beta_at(step_no[0] % cfg.steps, cfg.steps, cfg.beta_max))
        loss = (target - cm.metric(batch, mu, masks=masks).mean()).abs() + cfg.lam * penalty(masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_no[0] += 1

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up
        floor()
        step()
    best_floor = best_step = float("inf")
    for _ in range(args.repeats):
        best_floor = min(best_floor, timed(floor))
        best_step = min(best_step, timed(step))
    ratio = best_floor / best_step
    report = {"model": loaded.info["id"], "layers": cm.layers, "batch": list(batch.clean.shape),
              "n_latents": list(cm.n_latents.values()), "floor_ms": round(best_floor * 1e3, 2),
              "step_ms": round(best_step * 1e3, 2), "ratio_floor_over_step": round(ratio, 3)}
    print(json.dumps(report))
    print(f"floor (spliced forward+backward) {best_floor * 1e3:.1f} ms, mask step {best_step * 1e3:.1f} ms: "
          f"ratio {ratio:.2f} ({'meets' if ratio >= 0.7 else 'BELOW'} the 0.7 target)")


if __name__ == "__main__":
    main()
