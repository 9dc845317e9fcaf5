"""Stores larger than RAM: the loader, fit, eval and contexts reading a store the page cache cannot hold (not a test).

    python bench/big_store.py --dir /work/big --gb 28          # a 28 GB store (d_model 2048, 4 layers, bf16)
    python bench/big_store.py --dir /tmp/bs --gb 0.5 --quick   # every phase, small, in a few minutes
    python bench/big_store.py --dir /work/big --phases loader,eval  # some phases again (the store is reused)

The store is written through the schema's writer (StoreWriter.write_shard, what harvest's
background writer calls) from synthetic activations: a forward at d_model 2048 would take hours on
a CPU, and the readers only see bytes. Its provenance names a tiny model folder written beside it,
for the tokenizer contexts renders with. Phases, each measured in a fresh process (its own peak RSS):
  write    the writer's bytes/s over the whole store (final sync included) against a plain
           sequential write of the same disk (8 MiB writes, fdatasync);
  write-ram  the writer's own ceiling: a 2 GB store written to a RAM-backed folder (/dev/shm),
           no disk under it, so only the writer's CPU (one thread, as harvest's) limits it, against
           plain 8 MiB writes of the same bytes to one file there;
  disk     a sequential cold read of the store's shard files (8 MiB reads): the disk's bandwidth;
  loader   one epoch of the fit's loader over the big store, cold, batches taken and dropped:
           tokens/s, bytes/s against the disk's, peak RSS of the trainer side and of the loader
           process against the README's bound (two shuffle buffers);
  fit      RouteSAE (4 layers) from the big store, cold, against the same fit from a small store
           that the page cache holds: tokens/s, ratio against min(in-RAM fit, disk bandwidth /
           bytes per token) (target 0.8), peak RSS of both (the big store must not cost memory);
  eval, contexts   over the big store's held-out tail, resident memory sampled at every batch:
           over the second half of the run it must gain less than 10% of the bytes each token
           reads (a reader that held what it read would gain all of them).
Cold means the store's pages were dropped from the page cache first: a sync, then
posix_fadvise(DONTNEED) on every file of the store (no root needed; the store's bytes in the page
cache before and after, by util-linux's fincore, are printed as evidence). A store larger than RAM could not stay cached anyway.
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

D_MODEL, LAYERS, CONTEXT = 2048, [4, 8, 12, 16], 1024
K, EXPANSION, BATCH, BUFFER = 32, 4, 4096, 16384
BLOCK = 8 << 20


# --- helpers --------------------------------------------------------------------------------------


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of `files` in the page cache (util-linux's fincore; None without it)."""
    total = 0
    for i in range(0, len(files), 256):
        try:
            out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *map(str, files[i : i + 256])],
                                 capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
        total += sum(int(x) for x in out.split())
    return total


def drop_from_page_cache(root: Path) -> tuple[int | None, int | None]:
    """Sync, then drop every file under `root` from the page cache. -> the files' bytes in the
    page cache before and after."""
    files = [p for p in root.rglob("*") if p.is_file()]
    before = resident_bytes(files)
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return before, resident_bytes(files)


def shard_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "acts").rglob("*") if p.is_file() and p.name != "zarr.json")


def vm_kib(pid: int | str, field: str) -> int:
    """VmHWM / VmRSS of a process in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


# --- the store --------------------------------------------------------------------------------------


def write_store(path: Path, n_tokens: int, model_dir: Path) -> dict:
    """A complete store of n_tokens random bf16 activations; -> the writer's timing."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from routesae.store.zarr_store import StatsAccumulator, StoreWriter, plan_layout

    layout = plan_layout(CONTEXT, D_MODEL, len(LAYERS), 2, 8)
    n_tokens = n_tokens // layout.shard_tokens * layout.shard_tokens
    provenance = {"model": {"id": str(model_dir), "revision": None, "dtype": "bfloat16", "n_layers": 20},
                  "dataset": {"id": "synthetic", "split": "train", "text_field": "text", "shuffle_buffer": 0},
                  "context_len": CONTEXT}
    writer = StoreWriter.create(path, provenance, LAYERS, D_MODEL, "bfloat16", n_tokens, layout)
    stats = StatsAccumulator(LAYERS, D_MODEL)
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(64, D_MODEL, generator=gen)  # a low-rank part shared by dimensions, as residuals have
    writing = 0.0
    n_shards = n_tokens // layout.shard_tokens
    for shard in tqdm(range(n_shards), desc="write", unit="shard"):
        start = shard * layout.shard_tokens
        base = torch.randn(layout.shard_tokens, 64, generator=gen) @ mix + torch.randn(layout.shard_tokens, D_MODEL, generator=gen)
        acts = torch.stack([base * (1 + i) + torch.randn(1, D_MODEL, generator=gen) for i in range(len(LAYERS))])
        stored = acts.to(torch.bfloat16)
        positions = (np.arange(start, start + layout.shard_tokens) % CONTEXT).astype(np.int32)
        special = positions == 0
        ids = np.random.default_rng(shard).integers(3, 512, layout.shard_tokens).astype(np.int32)
        ids[special] = 1
        if shard % 16 == 0:  # statistics from a sample of shards: the normalization needs no more
            stats.add(stored.float(), torch.from_numpy(~special))
        raw = stored.view(torch.uint16).numpy()
        t0 = time.perf_counter()
        writer.write_shard(shard, raw, ids, positions, special)
        writing += time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.finish(n_tokens, stats.state())
    os.sync()
    writing += time.perf_counter() - t0
    return {"tokens": n_tokens, "bytes": n_tokens * len(LAYERS) * D_MODEL * 2, "seconds_writing": writing}


def disk_write_bandwidth(folder: Path, size: int) -> float:
    """Bytes/s of a plain sequential write of `size` bytes (8 MiB writes, then fdatasync)."""
    path = folder / "disk-write-test.bin"
    block = os.urandom(BLOCK)
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(max(1, size // BLOCK)):
            fh.write(block)
        fh.flush()
        os.fdatasync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return max(1, size // BLOCK) * BLOCK / seconds


def disk_read_bandwidth(files: list[Path], limit: int) -> tuple[float, int]:
    """Bytes/s of a sequential read of `files` in order (8 MiB reads), up to `limit` bytes."""
    buf = bytearray(BLOCK)
    done = 0
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while (n := fh.readinto(buf)) and done < limit:
                done += n
        if done >= limit:
            break
    return done / (time.perf_counter() - t0), done


def ensure_store(path: Path, n_tokens: int, model_dir: Path) -> dict:
    """Write the store unless a complete one of this size is there."""
    from routesae.store.zarr_store import Cache, remove_store

    if path.exists():
        try:
            cache = Cache.open(path, require_complete=True)
            if cache.d_model == D_MODEL and cache.layers == LAYERS and abs(cache.n_tokens - n_tokens) < 65536:
                print(f"reusing {path} ({cache.n_tokens:,} tokens)", file=sys.stderr)
                return {"tokens": cache.n_tokens, "reused": True}
        except Exception:
            pass
        remove_store(path)
    return write_store(path, n_tokens, model_dir)


def write_to_ram(model_dir: Path, size: int) -> dict | None:
    """The writer's timing into a tmpfs folder (removed after); None where there is no /dev/shm."""
    import shutil

    ram_dir = Path("/dev/shm")
    if not ram_dir.is_dir():
        return None
    folder = Path(tempfile.mkdtemp(prefix="routesae-write-", dir=ram_dir))
    try:
        plain = disk_write_bandwidth(folder, size)  # the same bytes as one file's 8 MiB writes: memory's own rate
        run = write_store(folder / "store.zarr", size // (len(LAYERS) * D_MODEL * 2), model_dir)
        run["plain_write_bytes_per_s"] = plain
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    run["bytes_per_s"] = run["bytes"] / run["seconds_writing"]
    return run


# --- children --------------------------------------------------------------------------------------


def child_loader(store: str, workers: str) -> dict:
    """One epoch of the fit's loader, batches dropped; RSS of this process and of the loader process."""
    from tqdm import tqdm

    from routesae.store.zarr_store import Cache
    from routesae.train.data import ChunkLoader, TokenSplit

    cache = Cache.open(store)
    split = TokenSplit.of(cache, 0.05)
    loader = ChunkLoader(cache, LAYERS, split, BATCH, 65536, seed=0, workers=workers)
    baseline = vm_kib("self", "VmRSS")
    helper_peak = 0
    tokens = 0
    bar = tqdm(total=loader.epoch_tokens, unit="tok", unit_scale=True, desc=f"loader ({workers})")
    t0 = time.perf_counter()
    for i, batch in enumerate(loader.batches()):
        tokens += batch.acts.shape[0]
        bar.update(batch.acts.shape[0])
        if i % 16 == 0:
            helper_peak = max([helper_peak] + [vm_kib(p, "VmHWM") for p in descendants(os.getpid())])
        if batch.position.offset >= loader.epoch_tokens:
            break
    seconds = time.perf_counter() - t0
    bar.close()
    buffer_bytes = loader.buffer_capacity * len(LAYERS) * D_MODEL * 2
    return {"tokens": tokens, "seconds": seconds, "bytes_per_token": len(LAYERS) * D_MODEL * 2,
            "baseline_rss": baseline, "peak_rss": peak_rss(), "loader_process_peak_rss": helper_peak,
            "buffer_bytes": buffer_bytes, "batch_f32_bytes": BATCH * len(LAYERS) * D_MODEL * 4}


def child_fit(store: str, out: str, steps: int) -> dict:
    import json as _json

    from routesae.train.config import FitConfig
    from routesae.train.trainer import fit

    cfg = FitConfig(cache=store, out=out, archs=["routesae"], ks=[K], expansion=EXPANSION, batch_size=BATCH,
                    buffer_tokens=BUFFER, tokens=(steps + 1) * BATCH, log_every=1, checkpoint_every=10_000,
                    progress=True, device="cpu", routed_layers=LAYERS)
    fit(cfg)
    rows = [_json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]  # the first step waits for the first buffer
    seconds = sum(BATCH / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": len(timed) * BATCH / seconds, "steps": len(timed), "peak_rss": peak_rss(),
            "nmse_first_last": [rows[0]["nmse"], rows[-1]["nmse"]]}


def child_command(args: list[str]) -> dict:
    """A routesae command in this process (its peak RSS is this process's), with the resident
    memory sampled at every step of its progress bar (the tokens read so far, the RSS then)."""
    from click.testing import CliRunner
    from tqdm import tqdm

    import routesae.evaluate.cache_eval as cache_eval
    import routesae.interpret.contexts as contexts
    from routesae.cli import main

    samples: list[tuple[int, int]] = []

    class SampledBar(tqdm):  # instrumentation only: the commands' own bars, RSS read at each update
        read = 0  # counted here: a bar disabled by --quiet counts nothing itself

        def update(self, n=1):
            out = super().update(n)
            SampledBar.read += int(n or 0)
            samples.append((SampledBar.read, vm_kib("self", "VmRSS")))
            return out

    cache_eval.tqdm = contexts.tqdm = SampledBar
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    if result.exit_code:
        raise SystemExit(f"{' '.join(args[:1])} failed: {result.output[-2000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss(), "rss_by_tokens": samples}


def rss_slope(samples: list[tuple[int, int]]) -> float:
    """Bytes of resident memory gained per token read, over the second half of the run (least
    squares): about 0 for a reader that streams, its bytes per token or more for one that holds."""
    import numpy as np

    half = [(t, r) for t, r in samples[len(samples) // 2:] if r > 0]
    if len(half) < 3:
        return float("nan")
    tokens, rss = (np.array(v, dtype=np.float64) for v in zip(*half))
    spread = ((tokens - tokens.mean()) ** 2).sum()
    return float(((tokens - tokens.mean()) * (rss - rss.mean())).sum() / spread) if spread > 0 else float("nan")


def run_child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], stdout=subprocess.PIPE, text=True)
    if r.returncode:
        raise SystemExit(f"child {args[0]} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


CHILDREN = {"loader": child_loader, "fit": child_fit, "command": lambda *a: child_command(list(a))}


# --- the bench -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, help="Folder for the stores (kept for reruns).")
    ap.add_argument("--gb", type=float, default=28.0, help="Size of the big store (activations).")
    ap.add_argument("--small-gb", type=float, default=1.5, help="Size of the store that stays in RAM.")
    ap.add_argument("--steps", type=int, default=12, help="Timed fit steps.")
    ap.add_argument("--quick", action="store_true", help="A smoke run: few steps, small disk tests.")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phases", default="write,write-ram,disk,loader,fit,eval,contexts",
                    help="Which phases to run (the store is written or reused whatever this says).")
    args = ap.parse_args()
    if args.child:
        name, *rest = json.loads(args.child)
        print(json.dumps(CHILDREN[name](*rest)))
        return
    if args.dir is None:
        ap.error("--dir is required")
    from routesae.selftest.tiny import save_tiny_llama

    root = args.dir
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "tokenizer-model"
    if not (model_dir / "config.json").exists():
        save_tiny_llama(model_dir)
    per_token = len(LAYERS) * D_MODEL * 2
    big, small = root / "big.zarr", root / "small.zarr"
    steps = 3 if args.quick else args.steps
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"RAM {gb(ram)}; big store {args.gb:g} GB of d_model {D_MODEL} x {len(LAYERS)} layers bf16 "
          f"({per_token:,} bytes/token); small store {args.small_gb:g} GB", file=sys.stderr)

    phases = set(args.phases.split(","))
    report: dict = {"ram_bytes": ram, "bytes_per_token": per_token}
    test_bytes = (256 << 20) if args.quick else (4 << 30)
    if "write" in phases:
        report["disk_write_bytes_per_s"] = disk_write_bandwidth(root, test_bytes)
    if "write-ram" in phases:
        report["write_ram"] = write_to_ram(model_dir, (256 << 20) if args.quick else 2_000_000_000)
    report["write"] = ensure_store(big, int(args.gb * 1e9 / per_token), model_dir)
    ensure_store(small, int(args.small_gb * 1e9 / per_token), model_dir)
    if "seconds_writing" in report["write"]:
        w = report["write"]
        w["bytes_per_s"] = w["bytes"] / w["seconds_writing"]

    report["evict"] = drop_from_page_cache(big)
    bw, read = disk_read_bandwidth(shard_files(big), test_bytes * 2)
    report["disk_read_bytes_per_s"], report["disk_read_bytes"] = bw, read

    if "loader" in phases:
        for workers in ("process", "mapped"):
            drop_from_page_cache(big)
            report[f"loader_{workers}"] = run_child("loader", str(big), workers)

    sae = root / "fit-big"  # kept: eval and contexts read it in later runs too
    if "fit" in phases or not (sae / "sae.safetensors").exists():
        import shutil

        shutil.rmtree(sae, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            drop_from_page_cache(big)
            report["fit_big"] = run_child("fit", str(big), str(sae), steps)
            disk_read_bandwidth(shard_files(small), 1 << 62)  # the small store into the page cache
            report["fit_small"] = run_child("fit", str(small), f"{tmp}/small", steps)

    from routesae.store.zarr_store import Cache

    tail = Cache.open(big).n_tokens - json.loads((sae / "config.json").read_text())["training"]["eval_range"][0]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for name, cmd in (("eval", ["eval", "--cache", str(big), "--sae", str(sae), "--baselines", "none", "--quiet",
                                    "--device", "cpu"]),
                          ("contexts", ["contexts", "--cache", str(big), "--sae", str(sae), "--quiet", "--device", "cpu"])):
            if name not in phases:
                continue
            drop_from_page_cache(big)
            run = run_child("command", *cmd, "--out", f"{tmp}/{name}")
            run["tokens"] = tail
            run["rss_slope_bytes_per_token"] = rss_slope(run["rss_by_tokens"])
            report[name] = run

    print(json.dumps(report, indent=1))
    summarize(report)


def summarize(r: dict) -> None:
    per = r["bytes_per_token"]
    disk = r["disk_read_bytes_per_s"]
    print(f"\nRAM {gb(r['ram_bytes'])}; store {gb(r['write'].get('bytes', 0) or r['write']['tokens'] * per)}")
    print(f"disk: cold sequential read {disk / 1e6:.0f} MB/s (the store's bytes in the page cache: "
          f"{gb(r['evict'][0] or 0)} -> {gb(r['evict'][1] or 0)} when dropped)")
    if "disk_write_bytes_per_s" in r:
        print(f"disk: sequential write {r['disk_write_bytes_per_s'] / 1e6:.0f} MB/s (8 MiB writes, fdatasync)")
    if "bytes_per_s" in r["write"] and "disk_write_bytes_per_s" in r:
        w = r["write"]["bytes_per_s"]
        print(f"writer (StoreWriter.write_shard calls, final sync included): {w / 1e6:.0f} MB/s = "
              f"{w / r['disk_write_bytes_per_s']:.2f}x the disk's sustained write (the calls return once the bytes "
              f"are in the page cache; the disk writes them back meanwhile)")
    if r.get("write_ram"):
        w = r["write_ram"]["bytes_per_s"]
        print(f"writer into RAM (/dev/shm, {gb(r['write_ram']['bytes'])}): {w / 1e6:,.0f} MB/s = {w / per:,.0f} tokens/s "
              f"of {per:,} bytes = {w / r['write_ram']['plain_write_bytes_per_s']:.2f}x plain 8 MiB writes of a file there "
              f"({r['write_ram']['plain_write_bytes_per_s'] / 1e6:,.0f} MB/s): its own ceiling, where a disk is faster")
    for workers in ("process", "mapped"):
        x = r.get(f"loader_{workers}")
        if x is None:
            continue
        rate = x["tokens"] / x["seconds"]
        bound = 2 * x["buffer_bytes"]
        if workers == "mapped":
            bound += 2 * x["batch_f32_bytes"]  # its batches are float32 copies, the one in training and the next
        grown = x["peak_rss"] - x["baseline_rss"]
        ok = grown <= 1.1 * bound and x["loader_process_peak_rss"] <= 1.1 * bound + (1 << 30)
        print(f"loader ({workers}), one cold epoch: {rate:,.0f} tok/s = {rate * per / 1e6:.0f} MB/s = "
              f"{rate * per / disk:.2f}x the disk's sequential read; RSS grew {gb(grown)}, loader process peak "
              f"{gb(x['loader_process_peak_rss'])}; bound {gb(bound)} "
              f"(2 buffers{' + 2 float32 batches' if workers == 'mapped' else ''}): {'held' if ok else 'EXCEEDED'}")
    if "fit_big" in r:
        fb, fs = r["fit_big"], r["fit_small"]
        limit = min(fs["tokens_per_s"], disk / per)
        print(f"fit RouteSAE: big store (cold) {fb['tokens_per_s']:,.0f} tok/s, small store (in RAM) "
              f"{fs['tokens_per_s']:,.0f} tok/s, disk / bytes per token {disk / per:,.0f} tok/s -> "
              f"{fb['tokens_per_s'] / limit:.2f}x of the smaller (target 0.8); peak RSS {gb(fb['peak_rss'])} "
              f"against {gb(fs['peak_rss'])} from the small store")
    for name in ("eval", "contexts"):
        x = r.get(name)
        if x is None:
            continue
        slope = x["rss_slope_bytes_per_token"]
        rss = [v for _, v in x["rss_by_tokens"]]
        print(f"{name}: {x['tokens']:,} tokens ({gb(x['tokens'] * per)} of activations) in {x['seconds']:.0f} s; "
              f"resident memory over the run {gb(min(rss))}-{gb(max(rss))}, peak {gb(x['peak_rss'])}; over its second "
              f"half it gained {slope:,.0f} bytes per token read against {per:,} read per token "
              f"({'streamed' if slope < 0.1 * per else 'NOT streamed'}: memory that goes down is handed back, not held)")

if __name__ == "__main__":
    main()
