"""`fit`: train one or several SAEs on the same batches from the activation cache, never the LLM.

An output folder OUT holds fit.json (the fit's arguments and store), checkpoint.pt while training,
and per SAE sae.safetensors, config.json and metrics.jsonl: in OUT itself for one SAE, in
OUT/ARCH-kK/ for several. config.json is written last: its presence marks a finished SAE.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from routesae.errors import RouteSAEError
from routesae.sae_record import harvest_bos, sae_record, safetensors_metadata
from routesae.model.loading import resolve_device
from routesae.store.zarr_store import Cache
from routesae.store.verify import raise_if_damaged
from routesae.atomic_files import is_temp_name, write_json, write_text
from routesae.model.compute_dtype import native_on
from routesae.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, write_safetensors
from routesae.train.coders.matryoshka import default_prefixes
from routesae.train.config import AGGREGATES, NORMALIZATIONS, ROUTINGS, FitConfig, SAEConfig
from routesae.cpu_memory import keep_freed_memory
from routesae.train.data import WORKERS, Batch, ChunkLoader, Position, TokenSplit, can_map
from routesae.train.device_feed import DeviceFeed
from routesae.train.distributed import Group, Shard, from_env
from routesae.train.normalize import dataset_scale
from routesae.train.saes import ARCHITECTURES, SAE, TrainOutput, build_sae
from routesae.train.schedule import lr_factor
from routesae.train.sparsity import SparsityControl

MANIFEST_NAME = "fit.json"
clock = time.monotonic
"""What the checkpoint interval in minutes is measured with (tests put a fake clock here)."""
SAE_FILES = ("sae.safetensors", "config.json", "metrics.jsonl")
"""What a fit writes per SAE."""
DEFAULT_DEAD_TOKENS = 10_000_000


class BatchSource(Protocol):
    """What the trainer reads batches from: ChunkLoader (the store) or TensorLoader (RAM)."""

    layers: list[int]
    epoch_tokens: int

    def batches(self, start: Position = Position(0, 0)) -> Iterator[Batch]: ...


class FitResult(NamedTuple):
    """What a finished fit reports."""

    outputs: list[Path]
    """The SAE folders, one per (architecture, k)."""
    tokens: int
    """Tokens trained on, in total."""
    steps: int
    """Optimizer steps taken (by each SAE)."""
    seconds: float
    """Wall time of the training loop in this process (data waits included)."""
    steady_tokens_per_s: float
    """Throughput after this process's first step (the first buffer's read excluded)."""
    already_done: bool = False
    """True when the output folder already held this finished fit (nothing was trained)."""
    main_process: bool = True
    """False on the ranks of a distributed fit other than rank 0 (which alone reports)."""


# --- planning: every check before anything is written -------------------------------------------


def _wait_for_device(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA runs it asynchronously; a CPU has none queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 where the hardware multiplies it natively (model/compute_dtype.py: CPU AVX512-BF16
        # or AMX, CUDA Ampere on), else float32; other devices keep float32 here
        return torch.bfloat16 if device.type in ("cpu", "cuda") and native_on("bfloat16", device) else torch.float32
    dtypes = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if name not in dtypes:
        raise RouteSAEError(f"unknown --dtype {name!r}; use auto, bfloat16 or float32")
    return dtypes[name]


def resolve_loader(name: str, plan: "FitPlan") -> str:
    """'auto' -> 'mapped' on the CPU where the store allows it (the trainer and the loader share the
    cores there, and mapping saves the buffer's copy), else 'process' (on a GPU the CPU is free
    for a loader process, and batches cross to the device in the storage dtype, half float32's bytes)."""
    if name != "auto":
        return name
    chunks = plan.split.chunks_per_buffer(plan.cfg.buffer_tokens)
    ok = plan.device.type == "cpu" and can_map(plan.cache, plan.read_layers, chunks)
    return "mapped" if ok else "process"


def sae_name(arch: str, k: int) -> str:
    return f"{arch}-k{k}"


@dataclass
class FitPlan:
    """A validated fit: what to train, on what, where."""

    cfg: FitConfig
    cache: Cache
    split: TokenSplit
    read_layers: list[int]
    """The union of the SAEs' layers, the order of the loader's layer dimension."""
    sae_configs: dict[str, SAEConfig]
    """Name (ARCH-kK) -> config, in training order."""
    out_dirs: dict[str, Path]
    budget: int
    """Training tokens in total."""
    dead_tokens: int
    device: torch.device
    compute_dtype: torch.dtype
    epoch_tokens: int = 0


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise RouteSAEError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")


def plan_fit(cfg: FitConfig, cache: Cache | None = None) -> FitPlan:
    """Check the arguments against the store; raises RouteSAEError, writes nothing."""
    if cache is None:
        cache = Cache.open(cfg.cache, require_complete=True)
        raise_if_damaged(cache)
    if not cfg.archs:
        raise RouteSAEError("no architecture given")
    for arch in cfg.archs:
        if arch not in ARCHITECTURES:
            raise RouteSAEError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    if len(set(cfg.archs)) != len(cfg.archs) or len(set(cfg.ks)) != len(cfg.ks):
        raise RouteSAEError("--arch and --k must not repeat a value")
    _check_choice(cfg.routing, ROUTINGS, "--routing")
    _check_choice(cfg.aggregate, AGGREGATES, "--aggregate")
    _check_choice(cfg.normalization, NORMALIZATIONS, "--normalization")
    _check_choice(cfg.loader, ("auto", *WORKERS), "the loader")
    d_model = cache.d_model
    n_latents = cfg.latents if cfg.latents is not None else round(cfg.expansion * d_model)
    if n_latents < 1:
        raise RouteSAEError(f"the latent count must be positive, got {n_latents}")
    if not cfg.ks or min(cfg.ks) < 1:
        raise RouteSAEError("--k must be positive")
    if max(cfg.ks) > n_latents:
        raise RouteSAEError(f"k={max(cfg.ks)} is larger than the latent count {n_latents}")
    if cfg.batch_size < 1:
        raise RouteSAEError("--batch-size must be at least 1")
    if not cfg.lr > 0:
        raise RouteSAEError("--lr must be positive")
    if cfg.tokens is not None and cfg.tokens < 1:
        raise RouteSAEError("--tokens must be positive")
    if not cfg.epochs > 0:
        raise RouteSAEError("--epochs must be positive")
    if cfg.buffer_tokens < 1:
        raise RouteSAEError("--buffer-tokens must be positive")
    if cfg.log_every < 1 or cfg.checkpoint_every < 1:
        raise RouteSAEError("--log-every and --checkpoint-every must be at least 1")
    if not cfg.checkpoint_minutes > 0:
        raise RouteSAEError(f"--checkpoint-minutes must be positive, got {cfg.checkpoint_minutes:g}")
    coders = {a: ARCHITECTURES[a].coder_class() for a in cfg.archs}
    unsteered = [a for a, c in coders.items() if not c.fixed_l0 and not c.targets_l0_itself]
    if unsteered and cfg.sparsity_coef is not None and len(cfg.ks) > 1:
        raise RouteSAEError(f"{', '.join(unsteered)} with a fixed --sparsity-coef would train the same SAE for every "
                            "--k; give one --k, or leave the coefficient to be steered")
    if cfg.matryoshka_prefixes is not None:
        prefixes = list(cfg.matryoshka_prefixes)
        if prefixes != sorted(set(prefixes)) or not all(0 < m < n_latents for m in prefixes):
            raise RouteSAEError(f"--matryoshka-prefixes must rise strictly between 0 and the latent count {n_latents}, "
                                f"got {prefixes}")
    if cfg.target_l0 is not None and not cfg.target_l0 > 0:
        raise RouteSAEError("--target-l0 must be positive")
    if cfg.target_l0 is not None and cfg.ks != [round(cfg.target_l0)]:
        raise RouteSAEError(f"--target-l0 {cfg.target_l0:g} is every SAE's k; give it or --k {','.join(map(str, cfg.ks))}, "
                            "not both")
    if cfg.sparsity_coef is not None and not cfg.sparsity_coef >= 0:
        raise RouteSAEError("--sparsity-coef must be non-negative")
    if not 0 <= cfg.sparsity_warmup <= 1:
        raise RouteSAEError("the sparsity warm-up must be a fraction between 0 and 1")
    if not (0 <= cfg.warmup and 0 <= cfg.decay and cfg.warmup + cfg.decay <= 1):
        raise RouteSAEError("warm-up and decay fractions must be non-negative and sum to at most 1")

    single = [cache.default_layer()] if cfg.layer is None else ([cfg.layer] if isinstance(cfg.layer, int) else list(cfg.layer))
    if not single or len(set(single)) != len(single):
        raise RouteSAEError(f"--layer must list distinct layers, got {single}")
    for layer in single if any(not ARCHITECTURES[a].multi_layer for a in cfg.archs) else []:
        if layer not in cache.layers:
            raise RouteSAEError(f"layer {layer} is not in the store (it holds {_ranges(cache.layers)})")
    if cfg.routed_layers is not None:
        routed = list(cfg.routed_layers)
    else:
        n = cache.n_model_layers
        routed = list(range(n // 4, 3 * n // 4 + 1))
    if any(ARCHITECTURES[arch].multi_layer for arch in cfg.archs):
        missing = [x for x in routed if x not in cache.layers]
        if missing:
            raise RouteSAEError(
                f"routed layers {_ranges(missing)} are not in the store (it holds {_ranges(cache.layers)}); "
                "harvest them or pass --routed-layers"
            )
        if len(routed) < 2 or len(set(routed)) != len(routed):
            raise RouteSAEError(f"routing needs at least two distinct routed layers, got {routed}")

    configs: dict[str, SAEConfig] = {}
    placements = [(arch, routed, "") if ARCHITECTURES[arch].multi_layer else
                  (arch, [layer], f"-l{layer}" if len(single) > 1 else "")
                  for arch in cfg.archs for layer in (single if not ARCHITECTURES[arch].multi_layer else [None])]
    for arch, layers, suffix in placements:
        scales = None
        if cfg.normalization == "dataset":
            scales = [dataset_scale(d_model, cache.stats(x).mean_norm) for x in layers]
        for k in cfg.ks:
            configs[sae_name(arch, k) + suffix] = SAEConfig(
                arch=arch,
                d_model=d_model,
                n_latents=n_latents,
                k=k,
                layers=list(layers),
                routing=cfg.routing,
                aggregate=cfg.aggregate,
                normalization=cfg.normalization,
                dataset_scale=scales,
                prefixes=(list(cfg.matryoshka_prefixes or default_prefixes(n_latents))
                          if ARCHITECTURES[arch].coder_name == "matryoshka" else None),
                cache_fingerprint=cache.fingerprint,
                model=cache.model,
            )
    read_layers = sorted({x for c in configs.values() for x in c.layers})
    out = Path(cfg.out)
    out_dirs = {name: out if len(configs) == 1 else out / name for name in configs}
    device = resolve_device(cfg.device)
    compute_dtype = resolve_compute_dtype(cfg.dtype, device)
    split = TokenSplit.of(cache, cfg.eval_tokens)
    return FitPlan(cfg, cache, split, read_layers, configs, out_dirs, 0, 0, device, compute_dtype)


def _ranges(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    parts, run = [], []
    for x in sorted(layers):
        if run and x == run[-1] + 1:
            run.append(x)
        else:
            if run:
                parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = [x]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts) or "none"


def planned_steps(budget: int, epoch_tokens: int, batch_size: int) -> int:
    """Optimizer steps a budget takes: each epoch ends with its own (shorter) last batch."""
    full, rest = divmod(budget, epoch_tokens)
    return full * -(-epoch_tokens // batch_size) + -(-rest // batch_size)


def size_budget(plan: FitPlan, source: BatchSource) -> None:
    """Fill in the plan's token budget and dead-latent threshold from the source's epoch size."""
    cfg = plan.cfg
    plan.epoch_tokens = source.epoch_tokens
    plan.budget = cfg.tokens if cfg.tokens is not None else max(1, round(cfg.epochs * source.epoch_tokens))
    plan.dead_tokens = cfg.dead_tokens if cfg.dead_tokens is not None else min(DEFAULT_DEAD_TOKENS, max(1, plan.budget // 4))


# --- the output folder ---------------------------------------------------------------------------


def _manifest(plan: FitPlan) -> dict[str, Any]:
    return {
        "fit": plan.cfg.result_fields(),
        "cache_fingerprint": plan.cache.fingerprint,
        "cache_tokens": plan.cache.n_tokens,
        "model": plan.cache.model,
        "saes": list(plan.sae_configs),
    }


def _check_same_source(saved: dict[str, Any], plan: FitPlan, what: str) -> None:
    out = plan.cfg.out
    if saved.get("cache_fingerprint") != plan.cache.fingerprint:
        before = (saved.get("model") or {}).get("id")
        raise RouteSAEError(
            f"{out} holds a {what} from another cache (model {before!r}, fingerprint {saved.get('cache_fingerprint')}); "
            f"this cache is model {plan.cache.model.get('id')!r}, fingerprint {plan.cache.fingerprint}: "
            "use another --out, or --overwrite to replace it"
        )
    if saved.get("cache_tokens") != plan.cache.n_tokens:
        raise RouteSAEError(
            f"{out} holds a {what} from this cache when it had {saved.get('cache_tokens')} tokens (now {plan.cache.n_tokens}); "
            "its split would differ: use another --out, or --overwrite to replace it"
        )
    mine = plan.cfg.result_fields()
    theirs = saved.get("fit", {})
    changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in changed)
        raise RouteSAEError(f"{out} holds a {what} with other settings ({diffs}); use another --out, the same "
                            "arguments, or --overwrite to replace it")


def _prepare_out(plan: FitPlan) -> tuple[dict[str, Any] | None, bool]:
    """-> (checkpoint to resume from or None, whether the fit is already finished)."""
    out = Path(plan.cfg.out)
    manifest_path = out / MANIFEST_NAME
    if out.exists() and not out.is_dir():
        raise RouteSAEError(f"--out {out} exists and is not a folder")
    if manifest_path.is_file():
        try:
            saved = json.loads(manifest_path.read_text())
        except ValueError:
            raise RouteSAEError(f"{manifest_path} is unreadable; move {out} away to start over") from None
        ckpt_path = out / CHECKPOINT_NAME
        if not ckpt_path.is_file() and not _finished_saes(out):
            # killed or failed before its first checkpoint: nothing trained is kept, start anew
            _remove_unstarted(out)
            return None, False
        if not _same_source_or_overwritten(saved, plan, "fit", saved):
            return None, False
        if ckpt_path.is_file():
            ckpt = load_checkpoint(ckpt_path)
            if not _same_source_or_overwritten(ckpt["manifest"], plan, "checkpoint", saved):
                return None, False
            return ckpt, False
        if all((d / "config.json").is_file() for d in plan.out_dirs.values()):
            return None, True
        return None, False
    if out.exists() and any(out.iterdir()):
        raise RouteSAEError(f"--out {out} exists, is not empty and holds no routesae fit; choose another folder")
    return None, False


def _finished_saes(out: Path) -> list[Path]:
    """The finished SAEs (config.json) in a fit folder, itself or its subfolders."""
    return [p for p in [out / "config.json", *out.glob("*/config.json")] if p.is_file()]


def _same_source_or_overwritten(manifest: dict[str, Any], plan: FitPlan, what: str, saved: dict[str, Any]) -> bool:
    """True when `manifest` is of this fit; otherwise the refusal, or with --overwrite the fit
    removed (its `saved` manifest says what it wrote) and False."""
    try:
        _check_same_source(manifest, plan, what)
        return True
    except RouteSAEError:
        if not plan.cfg.overwrite:
            raise
    _remove_fit(Path(plan.cfg.out), saved)
    return False


def _remove_fit(out: Path, saved: dict[str, Any]) -> None:
    """Remove the files a fit wrote (its manifest and checkpoint, each SAE's weights, config and
    metrics, then the SAE folders left empty); anything else in `out` is left alone."""
    names = saved.get("saes") or []
    for sub in [out] if len(names) <= 1 else [out / name for name in names]:
        for name in SAE_FILES:
            (sub / name).unlink(missing_ok=True)
        if sub != out and sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    (out / MANIFEST_NAME).unlink()


def _remove_killed_writes(out: Path, plan: FitPlan) -> None:
    """Remove the temporary files of the fit's own files that a kill mid-write left (a checkpoint's
    is as large as the SAEs and their optimizer state); nothing else in `out` is touched."""
    own = {CHECKPOINT_NAME, MANIFEST_NAME, *SAE_FILES}
    for folder in {out, *plan.out_dirs.values()}:
        if folder.is_dir():
            for p in folder.iterdir():
                if is_temp_name(p.name) and p.name[1:-len(".tmp")].rsplit(".", 2)[0] in own and p.is_file():
                    p.unlink()


def _remove_unstarted(out: Path) -> None:
    """Remove what a fit writes before its first checkpoint (fit.json, empty or metrics-only SAE
    folders); anything else in `out` is left alone."""
    if not out.is_dir():  # removed under a running fit: nothing left to tidy
        return
    for sub in [out, *(d for d in out.iterdir() if d.is_dir())]:
        metrics = sub / "metrics.jsonl"
        if metrics.is_file():
            metrics.unlink()
        if sub != out and not any(sub.iterdir()):
            sub.rmdir()
    (out / MANIFEST_NAME).unlink(missing_ok=True)


# --- training ------------------------------------------------------------------------------------


@dataclass
class _Meter:
    """Token-weighted averages between two lines of metrics.jsonl."""

    tokens: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)
    """Sums stay on the device until a line is written: no host sync per step."""

    def add(self, out: TrainOutput, n: int) -> None:
        self.tokens += n
        values = {"loss": out.loss, "nmse": out.nmse, "aux_loss": out.aux_loss, "l0": out.l0, **out.extra}
        for key, value in values.items():
            v = value.detach().float() * n
            self.sums[key] = self.sums[key] + v if key in self.sums else v

    def means(self) -> dict[str, Any]:
        t = max(self.tokens, 1)
        row: dict[str, Any] = {}
        for key, value in self.sums.items():
            mean = (value / t).cpu()
            row[key] = float(mean) if mean.dim() == 0 else [round(x, 6) for x in mean.tolist()]
        return row


@dataclass
class _Run:
    """One SAE being trained."""

    name: str
    out: Path
    sae: SAE
    opt: torch.optim.Optimizer
    layer_pos: list[int]
    since_fired: Tensor
    """[n_latents] int64: tokens since each latent last fired."""
    metrics_lines: int = 0
    meter: _Meter = field(default_factory=_Meter)
    sparsity: SparsityControl | None = None
    """The sparsity coefficient, for coders without a fixed k."""

    def select(self, acts: Tensor) -> Tensor:
        """This SAE's layers out of the loader's [n, n_layers, d]."""
        if not self.sae.multi_layer:
            return acts[:, self.layer_pos[0]]
        if self.layer_pos == list(range(acts.shape[1])):
            return acts
        return acts[:, self.layer_pos]


def _generator(seed: int, name: str) -> torch.Generator:
    """Each SAE's initial weights depend on the seed and its name only, so an SAE trained beside
    others ends with the weights it would have had alone."""
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def _make_optimizer(sae: SAE, lr: float, device: torch.device) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"lr": lr, "betas": (0.9, 0.999)}
    if device.type in ("cpu", "cuda"):
        kwargs["fused"] = True  # one kernel for all parameters; fp32 state
    scaled = sae.coder.lr_scales()
    if not scaled:
        return torch.optim.Adam(sae.parameters(), **kwargs)
    # parameters that Adam must move faster than the rest (its step is about lr whatever the gradient)
    special = {id(p) for p, _ in scaled}
    groups = [{"params": [p for p in sae.parameters() if id(p) not in special], "lr_scale": 1.0},
              *({"params": [p], "lr_scale": scale} for p, scale in scaled)]
    return torch.optim.Adam(groups, **kwargs)


def _build_runs(plan: FitPlan) -> list[_Run]:
    runs = []
    for name, sae_cfg in plan.sae_configs.items():
        sae = build_sae(sae_cfg, _generator(plan.cfg.seed, name)).to(plan.device)
        runs.append(
            _Run(
                name=name,
                out=plan.out_dirs[name],
                sae=sae,
                opt=_make_optimizer(sae, plan.cfg.lr, plan.device),
                layer_pos=[plan.read_layers.index(x) for x in sae_cfg.layers],
                since_fired=torch.zeros(sae_cfg.n_latents, dtype=torch.int64, device=plan.device),
                sparsity=_sparsity_control(sae, plan.cfg),
            )
        )
    return runs


def _sparsity_control(sae: SAE, cfg: FitConfig) -> SparsityControl | None:
    if sae.coder.fixed_l0:
        return None
    coef = cfg.sparsity_coef if cfg.sparsity_coef is not None else sae.coder.default_sparsity_coef
    # matched sparsity by default: steered to the k a TopK beside it would have; a --sparsity-coef
    # is kept fixed, and so is the coefficient of a penalty that aims at k itself
    steer = cfg.sparsity_coef is None and not sae.coder.targets_l0_itself
    return SparsityControl(coef, cfg.sparsity_warmup, sae.config.k if steer else None)


def _truncate_metrics(path: Path, lines: int) -> None:
    """Keep the first `lines` lines: those written before the checkpoint being resumed."""
    if not path.exists():
        if lines:
            raise RouteSAEError(f"{path} is missing; it should hold {lines} lines of metrics")
        return
    kept = path.read_text().splitlines(keepends=True)[:lines]
    write_text(path, "".join(kept))


class Trainer:
    """Runs a planned fit: the loop, logging, checkpoints, outputs."""

    def __init__(self, plan: FitPlan, source: BatchSource, group: Group | None = None):
        """group: the torchrun process group of a distributed fit (None: one process)."""
        if plan.device.type == "cpu":
            keep_freed_memory()
        self.plan = plan
        self.source = source
        self.group = group
        self.writes = group is None or group.is_main
        """Whether this process writes the output folder and shows progress (rank 0 alone)."""
        self.runs = _build_runs(plan)
        self.feed = DeviceFeed(plan.device)
        """Batches to the device (on CUDA through pinned staging and a copy stream: device_feed.py)."""
        self.step = 0
        self.tokens = 0
        self.position = Position(0, 0)
        self.checkpoint_step: int | None = None
        """The step of the checkpoint OUT holds (resumed from or written by this run), None before one."""

    # --- state ---------------------------------------------------------------------------------
    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "manifest": _manifest(self.plan),
            "step": self.step,
            "tokens": self.tokens,
            "position": list(self.position),
            "runs": {
                run.name: {
                    "sae": run.sae.state_dict(),
                    "optimizer": run.opt.state_dict(),
                    "since_fired": run.since_fired,
                    "metrics_lines": run.metrics_lines,
                    "meter": {"tokens": run.meter.tokens, "sums": dict(run.meter.sums)},
                    **({"sparsity": run.sparsity.state()} if run.sparsity else {}),
                }
                for run in self.runs
            },
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.step = int(ckpt["step"])
        self.checkpoint_step = self.step
        self.tokens = int(ckpt["tokens"])
        self.position = Position(*ckpt["position"])
        for run in self.runs:
            state = ckpt["runs"][run.name]
            run.sae.load_state_dict(state["sae"])
            run.opt.load_state_dict(state["optimizer"])
            run.since_fired.copy_(state["since_fired"])
            run.metrics_lines = int(state["metrics_lines"])
            meter = state["meter"]
            run.meter = _Meter(int(meter["tokens"]), {k: v.to(self.plan.device) for k, v in meter["sums"].items()})
            if run.sparsity and "sparsity" in state:
                run.sparsity = SparsityControl(**state["sparsity"])

    # --- one step --------------------------------------------------------------------------------
    def train_step(self, acts: Tensor, shard: Shard | None = None) -> None:
        """One optimizer step of every SAE on `acts`: the batch, or under a distributed fit this
        rank's slice of it (`shard` says which), the step then being the whole batch's."""
        plan, cfg = self.plan, self.plan.cfg
        n = acts.shape[0] if shard is None else shard.n_global
        lr = cfg.lr * lr_factor((self.tokens + n / 2) / plan.budget, cfg.warmup, cfg.decay)
        acts = acts.to(plan.device)  # already there when it came through self.feed
        for run in self.runs:
            dead = None
            if cfg.auxk:
                dead = run.since_fired >= plan.dead_tokens
                if not bool(dead.any()):
                    dead = None
            progress = self.tokens / plan.budget
            coef = run.sparsity.value(progress) if run.sparsity else 0.0
            if shard is None:
                out = run.sae.training_loss(run.select(acts), plan.compute_dtype, dead, cfg.auxk_coef, coef)
                out.loss.backward()
            else:
                out = self._distributed_loss(run, acts, shard, dead, coef)
            run.sae.coder.constrain_grad_()
            for group in run.opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
            run.sae.coder.constrain_weights_()
            run.since_fired += n
            run.since_fired[out.fired] = 0
            run.meter.add(out, n)
            if run.sparsity:
                run.sparsity.update(float(out.l0), progress)
        self.tokens += n
        self.step += 1
        self._lr = lr

    def _distributed_loss(self, run: _Run, acts: Tensor, shard: Shard, dead: Tensor | None, coef: float) -> TrainOutput:
        """Forward and backward on this rank's slice, then the whole batch's gradient and outputs
        on every rank (see distributed.py)."""
        assert self.group is not None
        cfg = self.plan.cfg
        with self.group.shard(shard):
            out = run.sae.training_loss(run.select(acts), self.plan.compute_dtype, dead, cfg.auxk_coef, coef)
        out.loss.backward()
        self.group.reduce_gradients(run.sae.parameters(), shard)
        return self.group.reduce_output(out, shard)

    def dead_fraction(self, run: _Run) -> float:
        return float((run.since_fired >= self.plan.dead_tokens).float().mean())

    def log(self, tokens_per_s: float, epoch: int) -> list[dict[str, Any]]:
        """Append one line per SAE to its metrics.jsonl; returns the lines."""
        rows = []
        for run in self.runs:
            row = {
                "step": self.step,
                "tokens": self.tokens,
                "epoch": epoch,
                "lr": self._lr,
                **run.meter.means(),
                **({"sparsity_coef": run.sparsity.value(self.tokens / self.plan.budget)} if run.sparsity else {}),
                "dead_frac": self.dead_fraction(run),
                "tokens_per_s": tokens_per_s,
            }
            if self.writes:
                with open(run.out / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            run.metrics_lines += 1
            run.meter = _Meter()
            rows.append(row)
        return rows

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> FitResult:
        """The loop, then the outputs. Interrupted (Ctrl-C), it raises KeyboardInterrupt with what is
        kept: the step of the last checkpoint, or that there is none yet."""
        try:
            return self._run()
        except KeyboardInterrupt:
            raise KeyboardInterrupt(self.interrupted_message()) from None

    @property
    def total_steps(self) -> int:
        return planned_steps(self.plan.budget, self.plan.epoch_tokens, self.plan.cfg.batch_size)

    def interrupted_message(self) -> str:
        """What an interrupt at this point keeps, in words (cli.py prints it after 'interrupted; ')."""
        cfg = self.plan.cfg
        where = f"fit stopped after step {self.step:,} of {self.total_steps:,}"
        if not self.writes:  # another rank of a torchrun: rank 0 holds the checkpoint
            return f"{where}; rank 0 says what is kept"
        if self.checkpoint_step is not None:
            return f"{where}; the checkpoint at step {self.checkpoint_step:,} is kept, rerun the same command to resume"
        return (f"{where}, before the first checkpoint (every {cfg.checkpoint_every:,} steps or "
                f"{cfg.checkpoint_minutes:g} minutes); nothing is kept yet")

    def save_checkpoint(self) -> None:
        save_checkpoint(Path(self.plan.cfg.out) / CHECKPOINT_NAME, self.checkpoint_payload())
        self.checkpoint_step = self.step

    def _run(self) -> FitResult:
        plan, cfg = self.plan, self.plan.cfg
        bar = tqdm(
            total=plan.budget, initial=self.tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
            disable=not cfg.progress or not self.writes, desc="fit", smoothing=0.1,
        )
        start = time.perf_counter()
        first_step_done = None
        tokens_at_first = self.tokens
        last_log_time, last_log_tokens = start, self.tokens
        last_checkpoint = clock()
        batches = self.source.batches(self.position)
        try:
            while self.tokens < plan.budget:
                batch = next(batches)
                acts = batch.acts
                if self.tokens + acts.shape[0] > plan.budget:
                    acts = acts[: plan.budget - self.tokens]
                if self.group is None:
                    self.train_step(self.feed(acts))
                else:  # the same global batch on every rank: each trains its slice
                    mine, shard = self.group.slice(acts)
                    self.train_step(self.feed(mine), shard)
                self.position = batch.position
                finished = self.tokens >= plan.budget
                logs = self.step % cfg.log_every == 0 or finished
                if first_step_done is None or logs:
                    _wait_for_device(plan.device)  # the clock then counts the GPU's work done, not queued
                now = time.perf_counter()
                if first_step_done is None:
                    first_step_done, tokens_at_first = now, self.tokens
                if logs:
                    rate = (self.tokens - last_log_tokens) / max(now - last_log_time, 1e-9)
                    rows = self.log(rate, batch.position.epoch)
                    last_log_time, last_log_tokens = now, self.tokens
                    bar.set_postfix_str(_postfix(self.runs, rows), refresh=False)
                bar.update(acts.shape[0])
                # by steps, or by time (a fit of fewer steps than --checkpoint-every keeps its work too)
                due = self.step % cfg.checkpoint_every == 0 or clock() - last_checkpoint >= 60 * cfg.checkpoint_minutes
                if due and not finished and self.writes:
                    self.save_checkpoint()
                    last_checkpoint = clock()
        finally:
            batches.close()
            bar.close()
        end = time.perf_counter()
        steady = (self.tokens - tokens_at_first) / (end - first_step_done) if first_step_done and end > first_step_done else 0.0
        if self.writes:
            self.write_outputs(end - start)
        return FitResult([run.out for run in self.runs], self.tokens, self.step, end - start, steady,
                         main_process=self.writes)

    def write_outputs(self, seconds: float) -> None:
        plan, cfg = self.plan, self.plan.cfg
        split = plan.split
        for run in self.runs:
            training = {
                "fit": cfg.to_dict(),
                "tokens_seen": self.tokens,
                "steps": self.step,
                "epochs_seen": self.tokens / plan.epoch_tokens,
                "train_range": [0, split.train_stop],
                "eval_range": list(split.eval_range),
                "special_tokens_excluded": not cfg.include_special,
                "dead_tokens": plan.dead_tokens,
                "dead_frac": self.dead_fraction(run),
                "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
                "device": str(plan.device),
                "relu_after_topk": True,
                **({"world_size": self.group.world_size} if self.group else {}),
                **({"sparsity_coef": run.sparsity.value(1.0), "target_l0": run.sparsity.target_l0} if run.sparsity else {}),
            }
            # what another tool needs to use the SAE (hooks, hub id, context, normalization, dtype)
            reuse = sae_record(
                run.sae.config, context_len=plan.cache.context_len, dataset=plan.cache.attrs.get("dataset"),
                bos=harvest_bos(), prepend_bos=True, special_tokens_excluded=not cfg.include_special,
            )
            meta = {"arch": run.sae.arch, "format": "routesae-sae-1", **safetensors_metadata(reuse)}
            write_safetensors(run.out / "sae.safetensors", run.sae.export_tensors(), meta)
            write_json(run.out / "config.json", {**run.sae.config.to_dict(), "reuse": reuse, "training": training})
        ckpt = Path(cfg.out) / CHECKPOINT_NAME
        if ckpt.exists():
            ckpt.unlink()


def _postfix(runs: list[_Run], rows: list[dict[str, Any]]) -> str:
    if len(runs) == 1:
        return (f"loss={rows[0]['loss']:.4f} nmse={rows[0]['nmse']:.4f}{_l0(runs[0], rows[0])} "
                f"dead={rows[0]['dead_frac']:.1%}")
    return " | ".join(f"{run.name} nmse={row['nmse']:.3f}{_l0(run, row)} dead={row['dead_frac']:.0%}"
                      for run, row in zip(runs, rows))


def _l0(run: _Run, row: dict[str, Any]) -> str:
    """' L0=31.8/32' for a coder whose L0 is steered or penalized toward k (where it can drift from
    it, so the bar shows how near it is); '' where k latents fire by construction."""
    if "l0" not in row or run.sae.coder.fixed_l0:
        return ""
    return f" L0={row['l0']:.1f}/{run.sae.config.k}"


def fit(cfg: FitConfig, source: BatchSource | None = None) -> FitResult:
    """Train the SAEs `cfg` asks for; resumes from OUT/checkpoint.pt when there is one.

    source: batches to train on instead of the store's (benchmarks); the store is still opened for
    its metadata and split. Where the store is read by a loader process (cfg.loader = 'process',
    or 'auto' on a GPU or with a compressed store): as with a PyTorch DataLoader's workers, a Python
    script calling fit() must do so under `if __name__ == "__main__":` (or set cfg.loader = 'thread').

    Under torchrun (WORLD_SIZE > 1 in the environment) the fit is data-parallel: each rank trains
    its slice of every batch and all end with the single-process weights (distributed.py)."""
    plan = plan_fit(cfg)
    group = from_env(plan.device)  # torchrun: this process's rank, device and process group
    try:
        if group is not None:
            plan.device = group.device
            if cfg.batch_size < group.world_size:
                raise RouteSAEError(f"--batch-size {cfg.batch_size} is smaller than the {group.world_size} ranks of "
                                    "this torchrun: each rank needs a slice of every batch")
        return _fit(plan, source, group)
    finally:
        if group is not None:
            group.close()


def _fit(plan: FitPlan, source: BatchSource | None, group: Group | None) -> FitResult:
    """fit() once the plan and the process group are known. Under torchrun every rank reads the
    same batches and trains; rank 0 alone writes (the folder's preparation, checkpoints, metrics,
    outputs), and every rank resumes from the checkpoint rank 0 found."""
    cfg = plan.cfg
    writes = group is None or group.is_main
    if source is None:
        source = ChunkLoader(
            plan.cache, plan.read_layers, plan.split, cfg.batch_size, cfg.buffer_tokens, cfg.seed,
            include_special=cfg.include_special, workers=resolve_loader(cfg.loader, plan),
        )
    elif list(source.layers) != plan.read_layers:
        raise ValueError(f"the batch source serves layers {source.layers}, the fit needs {plan.read_layers}")
    size_budget(plan, source)
    ckpt, done, refused = None, False, None
    if writes:
        try:
            ckpt, done = _prepare_out(plan)
        except RouteSAEError as e:
            if group is None:
                raise
            refused = e
    if group is not None:
        # rank 0's verdict on the folder; a refusal stops every rank with its message
        resume, done, message = group.broadcast((ckpt is not None, done, refused and str(refused)) if writes else None)
        if message is not None:
            raise refused or RouteSAEError(message)
        if resume and not writes:
            ckpt = load_checkpoint(Path(cfg.out) / CHECKPOINT_NAME)
        group.barrier()  # every rank holds the checkpoint before rank 0 may write the next one
    if done:
        return FitResult(list(plan.out_dirs.values()), 0, 0, 0.0, 0.0, already_done=True, main_process=writes)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(plan, source, group)
    out = Path(cfg.out)
    created = not out.exists()
    if writes:
        out.mkdir(parents=True, exist_ok=True)
        _remove_killed_writes(out, plan)
        write_json(out / MANIFEST_NAME, _manifest(plan))
        for run in trainer.runs:
            run.out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        trainer.restore(ckpt)
        if writes:
            tqdm.write(f"resuming {cfg.out} at step {trainer.step:,} ({trainer.tokens:,} of {plan.budget:,} tokens "
                       "trained)", file=sys.stderr)
    if writes:
        for run in trainer.runs:
            _truncate_metrics(run.out / "metrics.jsonl", run.metrics_lines)
        if cfg.progress:
            tqdm.write(f"training {len(trainer.runs)} SAE(s) on {plan.budget:,} tokens: {trainer.total_steps:,} steps of "
                       f"{cfg.batch_size:,}, a checkpoint every {cfg.checkpoint_every:,} steps or "
                       f"{cfg.checkpoint_minutes:g} minutes", file=sys.stderr)
    try:
        return trainer.run()
    except BaseException:
        # A fit that fails or is interrupted before its first checkpoint (a damaged store, a full
        # /dev/shm, Ctrl-C) leaves nothing behind, as its message says; after one, its files stay
        # for a rerun to resume from.
        if writes and not (out / CHECKPOINT_NAME).exists() and not _finished_saes(out):
            _remove_unstarted(out)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
