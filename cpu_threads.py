"""How many CPU threads a routesae process computes with: the cores it may use, not the cores the
machine has.

PyTorch sizes its intra-op pool from the machine's cores. A process pinned to fewer (taskset,
`docker --cpus`, a batch scheduler's cgroup) then runs more threads than it has cores, and two
jobs side by side on a small machine each wait on the other's threads at every parallel region.
So routesae takes the smaller of the process's CPU affinity and its cgroup CPU quota, unless the
user chose: `--threads N` on any command, or OMP_NUM_THREADS in the environment.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

from routesae.errors import RouteSAEError

_CGROUP_V2_QUOTA = Path("/sys/fs/cgroup/cpu.max")


class ThreadChoice(NamedTuple):
    threads: int | None  # None: leave PyTorch's own choice (the user set OMP_NUM_THREADS)
    reason: str  # where the number came from, for a log line or a bench


def cgroup_cpu_limit(path: Path = _CGROUP_V2_QUOTA) -> int | None:
    """Whole CPUs a cgroup v2 quota allows ('200000 100000' -> 2), None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by its cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def choose_threads(requested: int | None, environ: dict[str, str] | os._Environ = os.environ) -> ThreadChoice:
    """The intra-op thread count for this process, and why."""
    if requested is not None:
        if requested < 1:
            raise RouteSAEError(f"--threads must be at least 1, got {requested}")
        return ThreadChoice(requested, "--threads")
    if environ.get("OMP_NUM_THREADS", "").strip():
        return ThreadChoice(None, "OMP_NUM_THREADS")
    return ThreadChoice(usable_cores(), "the cores this process may use")


def apply_threads(requested: int | None) -> ThreadChoice:
    """Set PyTorch's intra-op thread count as choose_threads says (imports torch)."""
    choice = choose_threads(requested)
    if choice.threads is not None:
        import torch

        if torch.get_num_threads() != choice.threads:
            torch.set_num_threads(choice.threads)
    return choice
