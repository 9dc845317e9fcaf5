"""The dtype a command runs an LLM's forward in: a half dtype (bf16, fp16) only where the hardware
multiplies it natively, else float32.

Why: a CPU without native bf16 (AVX2 only, as many EPYCs) converts every bf16 operand to float32
and back, and a model spliced with SAEs ran one forward + backward 27 times slower in bf16 than in
float32 (13.8 s against 0.52 s). Every command that runs a model but stores nothing in its dtype
(circuit, circuit-data, steer) picks its compute dtype here. A harvest does not: its store keeps
activations in the dtype the forward ran in, and `repair` and eval's store-started clean runs need
that forward bit for bit.

The rule, for `--dtype auto` (an explicit dtype is used as given, with a note where it is slow):
- CPU: the wanted half dtype where the CPU multiplies it natively (bf16: AVX512-BF16 or AMX-BF16;
  fp16: AVX512-FP16 or AMX-FP16), else float32;
- CUDA: bf16 where the GPU has it natively (Ampere on), fp16 always, else float32;
- any other device (MPS, XPU, ...): the wanted dtype;
- float32 wanted: float32 everywhere (auto never lowers precision).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from routesae.errors import RouteSAEError

if TYPE_CHECKING:  # torch loads in the functions: the commands' --help and option lists stay quick
    import torch

CHOICES = ("auto", "float32", "bfloat16", "float16")
"""What a command's --dtype takes."""
HALF_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
"""/proc/cpuinfo flags of a CPU that multiplies each half dtype natively."""
TORCH_PROBES = {"bfloat16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
                "float16": ("_is_amx_fp16_supported",)}
"""torch.cpu's own probes (private, so each is looked up and skipped where absent)."""
_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


class ComputeDtype(NamedTuple):
    """The dtype picked and why."""

    name: str
    """'float32', 'bfloat16' or 'float16'."""
    reason: str
    """One clause for a progress line, e.g. 'this CPU has no native bf16; recorded bfloat16'."""
    slow: bool
    """True where a half dtype was asked for explicitly on hardware that only emulates it."""


def canonical(name: str) -> str:
    """'bf16' -> 'bfloat16', ...; a one-line error for anything else."""
    if name not in _NAMES:
        raise RouteSAEError(f"unknown dtype {name!r}; use {', '.join(CHOICES[1:])}")
    return _NAMES[name]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_cpu_dtypes() -> frozenset[str]:
    """The half dtypes this CPU multiplies natively ('bfloat16', 'float16'): by torch's probes, or
    by the /proc/cpuinfo flags where torch has no probe for them."""
    import torch

    flags = cpu_flags()
    cpu = getattr(torch, "cpu", None)
    found = set()
    for dtype, names in TORCH_PROBES.items():
        if any(getattr(cpu, probe, lambda: False)() for probe in names) or flags.intersection(HALF_FLAGS[dtype]):
            found.add(dtype)
    return frozenset(found)


def native_on(dtype: str, device: torch.device) -> bool:
    """Whether `device` multiplies `dtype` natively (float32 always)."""
    if dtype == "float32":
        return True
    if device.type == "cpu":
        return dtype in native_cpu_dtypes()
    if device.type == "cuda":
        import torch

        # emulated bf16 (before Ampere) counts as not native: it is the slow case this avoids
        if dtype == "float16":
            return True
        # torch asks the current GPU: make it the one asked about (cuda:1 of a mixed machine)
        with torch.cuda.device(device) if device.index is not None else contextlib.nullcontext():
            try:
                return torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch before 2.5 counts only native bf16 already
                return torch.cuda.is_bf16_supported()
    return True


def pick_compute_dtype(requested: str, wanted: str, device: torch.device, source: str = "recorded") -> ComputeDtype:
    """The dtype to run the model in. requested: 'auto' or a dtype (--dtype); wanted: the dtype
    'auto' starts from (the one the SAEs' store recorded); source: what `wanted` is, for the reason."""
    wanted = canonical(wanted)
    where = "this CPU" if device.type == "cpu" else f"this {device.type.upper()} device"
    short = {"bfloat16": "bf16", "float16": "fp16"}
    if requested != "auto":
        name = canonical(requested)
        if native_on(name, device):
            return ComputeDtype(name, f"--dtype {name}", False)
        return ComputeDtype(name, f"--dtype {name}; {where} has no native {short[name]}, so it runs far slower "
                                  "than float32 (--dtype auto picks float32 here)", True)
    if native_on(wanted, device):
        return ComputeDtype(wanted, f"{source} {wanted}" + (f", native on {where}" if wanted != "float32" else ""),
                            False)
    return ComputeDtype("float32", f"{where} has no native {short[wanted]}; {source} {wanted}", False)
