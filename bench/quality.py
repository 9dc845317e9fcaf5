"""The encode passes of `routesae probe` and `routesae absorption` against a plain encode of the same
activations, and the probe's fitting time.

    python bench/quality.py --store probes.zarr --sae runs/topk-k32 --sae runs/routesae-k32
    python bench/quality.py --store probes.zarr --sae runs --words 0     # every SAE of a fit folder, no absorption

Per SAE (a fit output folder stands for every SAE in it, as `probe` reads it):
1. Probing. `routesae probe` reads each dataset's last-token residuals from the labelled store
   (`read_dataset`: one read per layer, the whole dataset) and encodes the whole dataset at once
   (`sae_codes`: the residuals moved to the SAE's device, `encode_codes`: `sae.encode`, the dense
   codes back to the CPU as numpy). The bench calls those functions of quality/probe.py over every
   dataset of the store, and side by side a plain `sae.encode` of the same residuals already in
   memory (on the device, in the SAE's input layout), one batch per dataset as the probe batches.
   Printed: both times, the ratio plain / probe (the issue asks for at least 0.8), and apart the
   store reads of the SAE's layers and the ratio plain / (reads + probe encode). Reads after the
   first come from the page cache, as a second probe of the same store does.
2. Probe fitting, once per SAE, apart from the encode (`sae_rows`: the latent ranking and the
   logistic regressions of the SAE's and the random baseline's probes, every dataset and k; the
   issue asks for under a minute for one SAE over the CPU preset's store, `routesae probe-data
   --model smollm2 --preset cpu`), and the dense baselines at the SAE's layers (`dense_row`;
   `probe` fits them once per dataset and layer, shared by every SAE reading that layer).
3. Absorption. `routesae absorption` runs the model over the words once (`word_residuals`; not
   timed here: the residuals are collected once, before any timing), then per SAE `score_sae`
   encodes the train words and the test words, each set at once, in `sae_sites` (with the
   normalization's shift and scale, and RouteSAE's routing again, that the metric needs). The
   bench calls `sae_sites` on both word sets, side by side with a plain `sae.encode` of the same
   residuals in memory, the same two batches. Printed as for probing.
The encode sides alternate within each of --repeats rounds and the median is kept, so load from
other processes hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch


def plain_encode(sae: torch.nn.Module, inputs: list[torch.Tensor], device: torch.device) -> float:
    """Seconds of a plain `sae.encode` of each batch, already on the device in the SAE's layout."""
    t = time.perf_counter()
    for x in inputs:
        z = sae.encode(x)
        del z
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def probe_encode(sae: torch.nn.Module, data: list[Any], device: torch.device) -> float:
    """Seconds of probe's encode pass (quality/probe.py's sae_codes) over every dataset."""
    from routesae.quality.probe import sae_codes

    t = time.perf_counter()
    for d in data:
        codes = sae_codes(sae, d, device)  # numpy on the CPU: synchronized
        del codes
    return time.perf_counter() - t


def store_reads(store: Any, layers: list[int]) -> float:
    """Seconds of probe's reads (quality/probe.py's read_dataset) of every dataset at these layers."""
    from routesae.quality.probe import read_dataset

    t = time.perf_counter()
    for i in range(len(store.datasets)):
        read_dataset(store, i, layers)
    return time.perf_counter() - t


def sites(sae: torch.nn.Module, residuals: dict[str, dict[int, np.ndarray]]) -> float:
    """Seconds of absorption's encode pass (quality/absorption.py's sae_sites) of the train and test words."""
    from routesae.quality.absorption import sae_sites

    t = time.perf_counter()
    for part in ("train", "test"):
        sae_sites(sae, residuals[part])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a labelled store (`routesae probe-data`)")
    ap.add_argument("--sae", action="extend", nargs="+", required=True,
                    help="SAE folders, or fit output folders (all their SAEs); repeatable")
    ap.add_argument("--words", type=int, default=400,
                    help="absorption words (a seeded sample of the vocabulary's, 80/20 train/test; 0: skip absorption)")
    ap.add_argument("--model", default=None, help="load the SAEs' model from here (absorption; as its --model)")
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="probe ks (default: probe's 1 2 4 8 16 32)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds of each encode; medians are printed")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as routesae chooses)")
    args = ap.parse_args()

    from routesae.cpu_threads import apply_threads
    from routesae.interpret.codes import sae_input
    from routesae.model.loading import resolve_device
    from routesae.quality.probe import DEFAULT_KS, dense_row, read_dataset, sae_codes, sae_rows
    from routesae.quality.probe_store import LabelledStore
    from routesae.sae_folders import check_compatible, expand_sae_paths, load_saes

    threads = apply_threads(args.threads)  # what every routesae command does first
    device = resolve_device(args.device)
    store = LabelledStore.open(args.store)
    saes = load_saes(expand_sae_paths(args.sae), device)
    for s in saes:
        check_compatible(s, store)
    ks = sorted(set(args.ks or DEFAULT_KS))
    n_sets = len(store.datasets)
    print(f"labelled store {store.path}: {n_sets} datasets, {store.n_prompts:,} prompts, d_model {store.d_model}, "
          f"{store.storage_dtype}; device {device}, {torch.get_num_threads()} torch threads ({threads.reason}), "
          f"median of {args.repeats}")

    # --- 1. probing's encode pass ----------------------------------------------------------------
    print("\n1. probe encode, one batch per dataset (as `routesae probe`): plain sae.encode of the residuals in "
          "memory vs quality/probe.py's sae_codes (to the device, encode, codes to numpy)")
    print("| SAE | arch | layers | latents | plain encode (s) | probe encode (s) | ratio plain/probe "
          "| store reads (s) | ratio plain/(reads + encode) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    fit_times: dict[str, tuple[float, float, int]] = {}
    for s in saes:
        sae, layers = s.sae, list(s.sae.config.layers)
        data = [read_dataset(store, i, layers) for i in range(n_sets)]
        inputs = [sae_input(sae, {layer: d.acts[layer].to(device) for layer in layers}) for d in data]

        plain_encode(sae, inputs, device), probe_encode(sae, data, device)  # warm-up
        times: dict[str, list[float]] = {"plain": [], "probe": [], "reads": []}
        for _ in range(args.repeats):
            times["plain"].append(plain_encode(sae, inputs, device))
            times["probe"].append(probe_encode(sae, data, device))
            times["reads"].append(store_reads(store, layers))
        med = {k: statistics.median(v) for k, v in times.items()}
        cfg = sae.config
        where = str(layers[0]) if len(layers) == 1 else f"{layers[0]}..{layers[-1]}"
        print(f"| {s.name} | {cfg.arch} | {where} | {cfg.n_latents:,} | {med['plain']:.3f} | "
              f"{med['probe']:.3f} | {med['plain'] / med['probe']:.2f} | {med['reads']:.3f} | "
              f"{med['plain'] / (med['reads'] + med['probe']):.2f} |", flush=True)

        # the fitting, timed once (deterministic CPU work, minutes on a real store)
        codes = [sae_codes(sae, d, device) for d in data]
        t = time.perf_counter()
        n_rows = sum(len(sae_rows(d, s, c, ks, 0)) for d, c in zip(data, codes))
        t_fit = time.perf_counter() - t
        t = time.perf_counter()
        for d in data:
            for layer in layers:
                dense_row(d, layer)
        fit_times[s.name] = (t_fit, time.perf_counter() - t, n_rows)
        del data, inputs, codes
    print("(target: ratio plain/probe >= 0.8)")

    # --- 2. probe fitting --------------------------------------------------------------------------
    print(f"\n2. probe fitting, once per SAE: {n_sets} datasets x k {', '.join(map(str, ks))}, the SAE's probe and "
          "the random baseline's (sae_rows: ranking + logistic regressions, 10 C values each); the dense baselines "
          "at the SAE's layers apart (dense_row; shared by every SAE reading a layer)")
    print("| SAE | probes fitted | SAE + random probes (s) | per dataset (s) | dense baselines, its layers (s) | "
          "all (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in saes:
        t_fit, t_dense, n_rows = fit_times[s.name]
        print(f"| {s.name} | {n_rows} | {t_fit:.1f} | {t_fit / n_sets:.2f} | {t_dense:.1f} | {t_fit + t_dense:.1f} |")
    print("(target: SAE + random probes of one SAE over the CPU preset's store < 60 s)")

    if args.words:
        absorption_encode(saes, args, device)


def absorption_encode(saes: list[Any], args: argparse.Namespace, device: torch.device) -> None:
    """Part 3: the words through the model once, then per SAE sae_sites vs a plain encode."""
    from routesae.errors import RouteSAEError
    from routesae.model.loading import load_store_model
    from routesae.quality.absorption_cli import _same_model
    from routesae.quality.absorption_data import build_prompts, split_words, vocab_words, word_residuals

    recorded = _same_model(saes)
    loaded = load_store_model(saes[0].path, recorded, args.model, args.device, "score absorption with", dtype="auto")
    tok = loaded.tokenizer
    split = split_words(vocab_words(tok), 0, args.words, what=f"the tokenizer of {loaded.info['id']}")
    layers = sorted({layer for s in saes for layer in s.sae.config.layers})
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    t = time.perf_counter()
    residuals = {}
    for part, words in (("train", split.train), ("test", split.test)):
        prompts = build_prompts(tok, words, split.train, seed=int(part == "test"))
        residuals[part] = word_residuals(loaded.model, prompts, layers, 32, pad, False)
    t_model = time.perf_counter() - t
    del loaded
    print(f"\n3. absorption encode, {len(split.train)} train + {len(split.test)} test words (the model's forward over "
          f"them, {t_model:.1f} s, ran once before and is not in these figures), each set in one batch: plain "
          "sae.encode of the residuals in memory vs quality/absorption.py's sae_sites")
    print("| SAE | arch | plain encode (s) | sae_sites (s) | ratio plain/sae_sites |")
    print("|---|---|---:|---:|---:|")
    for s in saes:
        sae, sae_layers = s.sae, list(s.sae.config.layers)
        multi = getattr(sae, "multi_layer", False)
        inputs = [torch.from_numpy(np.stack([residuals[p][layer] for layer in sae_layers], axis=1) if multi
                                   else residuals[p][sae_layers[0]]).to(device) for p in ("train", "test")]
        try:
            sites(sae, residuals)  # warm-up; a soft-routing RouteSAE is refused here, as absorption refuses it
        except RouteSAEError as e:
            print(f"| {s.name} | {sae.config.arch} | - | - | absorption refuses it: {e} |")
            continue
        plain_encode(sae, inputs, device)
        times: dict[str, list[float]] = {"plain": [], "sites": []}
        for _ in range(args.repeats):
            times["plain"].append(plain_encode(sae, inputs, device))
            times["sites"].append(sites(sae, residuals))
        tp, ts = statistics.median(times["plain"]), statistics.median(times["sites"])
        print(f"| {s.name} | {sae.config.arch} | {tp:.4f} | {ts:.4f} | {tp / ts:.2f} |", flush=True)
    print("(target: ratio plain/sae_sites >= 0.8)")


if __name__ == "__main__":
    main()
