"""`routesae selftest`: run every stage once on a device, as a user runs it, and check the device
against a CPU float32 reference computed in the same run.

Each stage is the real command in a subprocess (`python -m routesae.selftest.stage`, which is
`python -m routesae` plus a record of its peak memory): harvest, fit (TopK, RouteSAE, JumpReLU),
eval --splice, contexts, steer, circuit-data and circuit, into one folder. This process then loads
the store's model in float32 on the CPU and checks (checks.py):
(a) the first harvest batch's stored activations against its forward of the same contexts;
(b) the device's splice KL per token of eval's first batch against its own splice of that batch;
(c) every fitted SAE's loss going down (first vs last line of metrics.jsonl).
The result is one JSON object: per stage seconds, tokens and tokens/s, peak GPU memory
(torch.cuda.max_memory_allocated, and max_memory_reserved: what the caching allocator held; None off
CUDA) and peak RSS; each check; the device; ok.

What only a GPU exercises, so that `--device cpu` (CI) never checks it:
- CUDA kernels: the bf16 forward of harvest, splice, steer and circuit (cuBLAS, SDPA attention),
  the fit's sparse TopK / threshold backward and bf16 encoder matmul on the GPU, and the rounding
  that depends on a batch's size (eval then proves the store equal on a whole batch, not one context);
- `--dtype auto` choosing bf16 because the GPU multiplies it natively (Ampere on);
- the fit's loader process feeding a GPU through shared memory, and the pinned, non-blocking
  host-to-device copies overlapping with training (on a CPU the copy is a no-op, so their effect
  cannot be seen); likewise the harvest's device-to-host copy of each batch (host_staging.py);
- NCCL: torchrun fit and harvest over several GPUs (CPU ranks use gloo);
- peak GPU memory (null on a CPU)."""

from __future__ import annotations

import contextlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from routesae.errors import RouteSAEError
from routesae.json_values import jsonable
from routesae.selftest.checks import LOSS_CHECK, Check, activation_check, failed, kl_check, loss_check

GPU_ONLY = [
    "CUDA kernels: the bf16 forward (harvest, splice, steer, circuit), the fit's sparse backward and bf16 encoder "
    "matmul on the GPU, batch-size-dependent rounding",
    "--dtype auto picking bf16 where the GPU multiplies it natively",
    "pinned staging memory, the fit's copy stream and its events overlapping copies with training (the staging "
    "itself, the loader process and 'auto''s CUDA choices run on a CPU in tests/test_train_gpu_branches.py)",
    "the harvest's pinned, non-blocking copy of each batch from its device buffer (the staging itself runs on a CPU "
    "in tests/test_harvest_staging.py)",
    "NCCL (torchrun over several GPUs; CPU ranks use gloo)",
    "peak GPU memory",
]
"""What `--device cpu` cannot exercise (the module's docstring says more)."""
STEER_PROMPT = "When you visit a new city, you"
MIN_FIT_STEPS = 48
"""Fit steps the self-test's sizes aim at (smaller batches for a small --tokens), down to batches of 64."""


@dataclass
class SelftestConfig:
    """The arguments of `routesae selftest`."""

    device: str = "auto"
    """auto (CUDA if present), cpu, cuda, cuda:N: where every stage runs."""
    model: str = "smollm2"
    """The model every stage uses: a hub id, a local folder, a .gguf file or smollm2 (offline)."""
    tiny: bool = False
    """Use a random-weight tiny Llama built in the output folder (CI: about a minute on a CPU)."""
    tokens: int | None = None
    """Tokens to harvest; None: 2M on CUDA, 32,768 on a CPU."""
    context_len: int | None = None
    """Tokens per context; None: 512 (64 with tiny)."""
    batch_size: int | None = None
    """Contexts per harvest forward (eval's batches follow); None: 32 on CUDA, else 8."""
    circuit_task: str | None = None
    """The circuit-data task; None: sva (list-index with tiny: its tokenizer splits sva's answers)."""
    out: str | None = None
    """Folder for everything the stages write (absent or empty); None: a temporary one, removed after."""
    progress: bool = True
    """A line on stderr as each stage starts."""


class Sizes(NamedTuple):
    """How much each stage does."""

    tokens: int
    context_len: int
    harvest_batch: int
    fit_batch: int
    k: int
    expansion: float
    eval_tokens: int
    circuit_task: str
    circuit_pairs: int
    new_tokens: int


def plan_sizes(cfg: SelftestConfig, cuda: bool) -> Sizes:
    """The stages' sizes: CUDA ~2M tokens in under 8 minutes on one H100; a CPU about a minute tiny."""
    context_len = cfg.context_len or (64 if cfg.tiny else 512)
    tokens = cfg.tokens if cfg.tokens is not None else (2_000_000 if cuda else 32_768)
    if tokens < 4 * context_len:
        raise RouteSAEError(f"--tokens {tokens:,} is fewer than 4 contexts of {context_len}: too few to fit and hold out")
    # Enough steps for the loss check to see a trend: JumpReLU's loss carries a sparsity penalty that
    # ramps up over the first 5% of the budget, which a handful of steps never gets past.
    fit_batch = 4096 if cuda else 512
    while fit_batch > 64 and int(tokens * 0.9) // fit_batch < MIN_FIT_STEPS:
        fit_batch //= 2
    return Sizes(
        tokens=tokens, context_len=context_len, harvest_batch=cfg.batch_size or (32 if cuda else 8),
        fit_batch=fit_batch, k=32 if cuda else 8, expansion=8.0,
        eval_tokens=65_536 if cuda else 32 * context_len,
        circuit_task=cfg.circuit_task or ("list-index" if cfg.tiny else "sva"),
        circuit_pairs=64 if cuda else 16, new_tokens=16)


class StageRun(NamedTuple):
    """One command's run."""

    ok: bool
    seconds: float
    stdout: str
    record: dict[str, Any]
    """Its peak memory (stage.py); {} if it died before writing it."""
    error: str | None
    """The last lines of its stderr where it failed."""


class Stages:
    """Runs the commands one after another into `out`, their stderr in out/logs/STAGE.log."""

    def __init__(self, out: Path, progress: bool):
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.report: dict[str, dict[str, Any]] = {}
        self.stopped: str | None = None
        """The stage that failed; later stages are skipped."""

    def run(self, name: str, args: list[str]) -> StageRun | None:
        if self.stopped is not None:
            self.report[name] = {"ok": False, "skipped": f"{self.stopped} failed"}
            return None
        if self.progress:
            print(f"routesae selftest: {name}: routesae {' '.join(args)}", file=sys.stderr, flush=True)
        record = self.logs / f"{name}.memory.json"
        log = self.logs / f"{name}.log"
        started = time.perf_counter()
        with open(log, "w") as err:
            done = subprocess.run([sys.executable, "-m", "routesae.selftest.stage", str(record), *args],
                                  stdout=subprocess.PIPE, stderr=err, text=True, cwd=self.out)
        seconds = time.perf_counter() - started
        memory = json.loads(record.read_text()) if record.is_file() else {}
        error = None
        if done.returncode != 0:
            lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
            error = f"exit {done.returncode}: " + (" | ".join(lines[-3:]) or "no message")
            self.stopped = name
        self.report[name] = {"ok": error is None, "seconds": round(seconds, 2), "tokens": None, "tokens_per_s": None,
                             **memory, "command": ["routesae", *args], "log": str(log),
                             **({"error": error} if error else {})}
        return StageRun(error is None, seconds, done.stdout, memory, error)

    def tokens(self, name: str, tokens: int | None, **extra: Any) -> None:
        """Record a stage's tokens (and tokens/s over its whole wall time, start-up included)."""
        entry = self.report[name]
        entry["tokens"] = tokens
        if tokens is not None and entry["seconds"] > 0:
            entry["tokens_per_s"] = round(tokens / entry["seconds"], 3)
        entry.update(extra)


@contextlib.contextmanager
def workspace(out: str | None) -> Iterator[Path]:
    """The output folder: `out` (absent or empty, kept) or a temporary folder removed afterwards."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="routesae-selftest-") as tmp:
            yield Path(tmp)
        return
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RouteSAEError(f"--out {out} is not an empty folder: give a new one (the self-test writes a store, "
                            "SAEs and reports there)")
    path.mkdir(parents=True, exist_ok=True)
    yield path.resolve()


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _peak(stages: dict[str, dict[str, Any]], key: str) -> int | None:
    values = [s[key] for s in stages.values() if s.get(key) is not None]
    return max(values) if values else None


def run_selftest(cfg: SelftestConfig) -> dict[str, Any]:
    """Run the stages and checks; -> the JSON-ready result (its "ok": every stage ran, every check held)."""
    import torch

    from routesae.model.loading import resolve_device

    device = resolve_device(cfg.device)
    sizes = plan_sizes(cfg, device.type == "cuda")
    dev = str(device)
    started = time.perf_counter()
    with workspace(cfg.out) as out:
        model = cfg.model
        if cfg.tiny:
            from routesae.selftest.tiny import save_tiny_llama

            model = str(save_tiny_llama(out / "tiny-model"))
        st = Stages(out, cfg.progress)
        checks: list[Check] = []
        store, runs = out / "store.zarr", out / "runs"
        reference = None  # the CPU float32 model

        # --- harvest, then (a) -----------------------------------------------------------------
        if st.run("harvest", ["harvest", "--model", model, "--dataset", "builtin", "--tokens", str(sizes.tokens),
                              "--context-len", str(sizes.context_len), "--batch-size", str(sizes.harvest_batch),
                              "--device", dev, "--out", str(store), "--quiet"]):
            from routesae.store.zarr_store import Cache

            cache = Cache.open(store)
            st.tokens("harvest", cache.n_tokens, compute_dtype=_compute_dtype(cache),
                      store_bytes=cache.nbytes_on_disk())
            reference = _cpu_reference(cache)
            checks.append(_check_activations(cache, reference))
        else:
            checks.append(failed("harvest: first batch's stored activations vs a CPU float32 forward",
                                 "the harvest did not finish"))

        # --- fit, then (c) -----------------------------------------------------------------------
        layers = _store_layers(store) if st.stopped is None else []
        a, b = (layers[len(layers) // 2], layers[-1]) if layers else (0, 0)
        names = [f"topk-k{sizes.k}-l{a}", f"topk-k{sizes.k}-l{b}", f"jumprelu-k{sizes.k}-l{a}",
                 f"jumprelu-k{sizes.k}-l{b}", f"routesae-k{sizes.k}"]
        steps = max(1, int(sizes.tokens * 0.9) // sizes.fit_batch)
        if st.run("fit", ["fit", "--cache", str(store), "--out", str(runs), "--arch", "topk,routesae,jumprelu",
                          "--k", str(sizes.k), "--expansion", str(sizes.expansion), "--layer", f"{a},{b}",
                          "--batch-size", str(sizes.fit_batch), "--log-every", str(max(1, steps // 12)),
                          "--device", dev, "--no-progress"]):
            trained, steady = _fit_tokens(Path(st.report["fit"]["log"]))
            st.tokens("fit", trained, steady_tokens_per_s=steady)
            checks.append(loss_check({n: runs / n for n in names}))
        else:
            checks.append(failed(LOSS_CHECK, "the fit did not finish"))

        # --- eval --splice, then (b) -------------------------------------------------------------
        if st.run("eval", ["eval", "--sae", str(runs), "--cache", str(store), "--splice", "--tokens",
                           str(sizes.eval_tokens), "--device", dev, "--out", str(out / "eval"), "--quiet"]):
            import numpy as np

            per_context = np.load(out / "eval" / "per_context.npz")
            st.tokens("eval", int(len(per_context["contexts"])) * sizes.context_len)
            checks.append(_check_kl(store, runs, [names[1], names[-1]], sizes.eval_tokens, per_context, reference))
        else:
            checks.append(failed("eval --splice: KL per token of one batch, device vs CPU float32",
                                 "eval --splice did not finish"))

        # --- contexts, steer, circuit --------------------------------------------------------------
        if st.run("contexts", ["contexts", "--sae", str(runs), "--cache", str(store), "--tokens", str(sizes.eval_tokens),
                               "--out", str(out / "contexts"), "--device", dev, "--quiet"]):
            st.tokens("contexts", _tokens_read(store, sizes.eval_tokens))
        steered = st.run("steer", ["steer", "--sae", str(runs / names[1]), "--latent", "0", "--mode", "add",
                                   "--value", "10", "--prompt", STEER_PROMPT, "--max-new-tokens",
                                   str(sizes.new_tokens), "--device", dev, "--json"])
        if steered:
            result = json.loads(steered.stdout)["results"][0]
            generated = len(result["baseline"]["token_ids"]) + len(result["steered"]["token_ids"])
            st.tokens("steer", generated, steered_text=result["steered"]["text"],
                      baseline_text=result["baseline"]["text"], first_step_kl=result["first_step"]["kl"])
        task = out / "circuit" / f"{sizes.circuit_task}.jsonl"
        task.parent.mkdir(exist_ok=True)
        if st.run("circuit-data", ["circuit-data", "--task", sizes.circuit_task, "--model", model, "--n",
                                   str(sizes.circuit_pairs), "--device", dev, "--out", str(task), "--quiet"]):
            st.tokens("circuit-data", None, pairs=sizes.circuit_pairs)
        if st.run("circuit", ["circuit", "--task", str(task), "--saes", str(runs / names[0]), str(runs / names[1]),
                              "--lambdas", "0.1", "--steps", "1", "--ig-steps", "1", "--device", dev,
                              "--out", str(out / "circuit" / "masks"), "--quiet"]):
            st.tokens("circuit", None, mask_steps=1)

        stages = st.report
        if cfg.out is None:  # the logs go with the temporary folder
            for entry in stages.values():
                entry.pop("log", None)
        ok = all(s["ok"] for s in stages.values()) and all(c.held for c in checks)
        return {
            "ok": ok,
            "device": {"name": device_name(device), "type": device.type, "index": device.index,
                       "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None},
            "model": cfg.model if not cfg.tiny else "tiny random-weight Llama (d_model 64, 4 blocks)",
            "out": None if cfg.out is None else str(out),
            "sizes": sizes._asdict(),
            "seconds": round(time.perf_counter() - started, 2),
            "peak_gpu_bytes": _peak(stages, "peak_gpu_bytes") if device.type == "cuda" else None,
            "peak_gpu_reserved_bytes": _peak(stages, "peak_gpu_reserved_bytes") if device.type == "cuda" else None,
            "peak_rss_bytes": _peak(stages, "peak_rss_bytes"),
            "stages": stages,
            "checks": [jsonable(c.as_dict()) for c in checks],
            "gpu_only": {"exercised": device.type == "cuda", "paths": GPU_ONLY},
        }


# --- the reference computations ---------------------------------------------------------------------
def _compute_dtype(cache: Any) -> str:
    recorded = cache.model
    return str(recorded.get("compute_dtype") or recorded.get("dtype", "bfloat16"))


def _store_layers(store: Path) -> list[int]:
    from routesae.store.zarr_store import Cache

    return Cache.open(store).layers


def _cpu_reference(cache: Any) -> Any:
    """The store's model in float32 on the CPU (the reference of checks (a) and (b))."""
    from routesae.model.loading import load_model, store_model_spec

    return load_model(store_model_spec(cache.path, cache.model, None), "float32", "cpu").model


def first_batch_hidden_states(model: Any, input_ids: Any, layers: list[int], chunk: int = 4) -> dict[int, Any]:
    """hidden_states[layer] (transformers' numbering) of `input_ids` [contexts, ctx] in float32, a few
    contexts per forward, the LM head never run."""
    import torch

    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with torch.inference_mode():
        for i in range(0, input_ids.shape[0], chunk):
            hidden = model.base_model(input_ids[i:i + chunk], output_hidden_states=True).hidden_states
            for layer in layers:
                out[layer].append(hidden[layer].float())
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def _check_activations(cache: Any, reference: Any) -> Check:
    ctx, n_ctx = cache.context_len, min(cache.harvest_batch_size or 8, cache.n_tokens // cache.context_len)
    n = n_ctx * ctx
    ids = cache.token_ids(0, n).view(n_ctx, ctx)
    keep = ~cache.special(0, n).view(n_ctx, ctx)
    want = first_batch_hidden_states(reference, ids, cache.layers)
    stored = {layer: cache.acts(layer, 0, n).view(n_ctx, ctx, -1) for layer in cache.layers}
    return activation_check(stored, want, keep, _compute_dtype(cache))


def _check_kl(store: Path, runs: Path, names: list[str], eval_tokens: int, per_context: Any, reference: Any) -> Check:
    """(b) on eval's first batch of contexts: the device's per-context KL sums from per_context.npz
    against the CPU float32 model's splice of the same contexts, per SAE in `names`."""
    import numpy as np
    import torch

    from routesae.evaluate.run import splice_metrics
    from routesae.evaluate.targets import Target
    from routesae.sae_folders import held_out_range, load_saes
    from routesae.store.zarr_store import Cache

    name = "eval --splice: KL per token of one batch, device vs CPU float32"
    if reference is None:
        return failed(name, "no CPU reference: the harvest did not finish")
    cache = Cache.open(store)
    saes = load_saes([str(runs / n) for n in names], torch.device("cpu"))
    start, stop = held_out_range(cache, saes, False, eval_tokens)
    ctx, batch = cache.context_len, cache.harvest_batch_size or 8
    step = batch * ctx  # eval's batches line up with multiples of the harvest's from the store's start
    stop = min(stop, (start // step + 1) * step)
    run = splice_metrics(reference, cache, [Target(s.name, s.sae, "router", 0) for s in saes], start, stop, batch,
                         prefix="live", progress=False)
    columns = np.isin(per_context["contexts"], np.arange(start // ctx, stop // ctx))
    rows = [str(x) for x in per_context["names"]]
    device_kl, reference_kl = {}, {}
    for s, pc in zip(saes, run.per_context):
        reference_kl[s.name] = float(pc["kl_sum"].sum() / pc["n_kl"].sum())
        if s.name in rows:
            i = rows.index(s.name)
            device_kl[s.name] = float(per_context["kl_sum"][i, columns].sum() / per_context["n_kl"][i, columns].sum())
    check = kl_check(device_kl, reference_kl, _compute_dtype(cache))
    check.detail["contexts"] = [start // ctx, stop // ctx]  # store context indices [first, last + 1)
    return check


def _fit_tokens(log: Path) -> tuple[int | None, float | None]:
    """Tokens the fit trained on and its own steady tokens/s, from its last stderr line
    ("trained N SAE(s) on T tokens in S steps (R tokens/s)")."""
    found = re.search(r"on ([\d,]+) tokens in \d+ steps \(([\d,]+) tokens/s\)", log.read_text(errors="replace"))
    if not found:
        return None, None
    return int(found.group(1).replace(",", "")), float(found.group(2).replace(",", ""))


def _tokens_read(store: Path, cap: int) -> int:
    """Tokens contexts read: the held-out tail, capped, in whole contexts."""
    import torch

    from routesae.sae_folders import held_out_range, load_saes
    from routesae.store.zarr_store import Cache

    cache = Cache.open(store)
    runs = store.parent / "runs"
    saes = load_saes([str(p) for p in sorted(runs.iterdir()) if (p / "config.json").is_file()], torch.device("cpu"))
    start, stop = held_out_range(cache, saes, False, cap)
    return stop - start
