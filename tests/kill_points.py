"""Start a long job and wait until it has just written a checkpoint: where the kill-and-resume
tests strike."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def start_at_checkpoint(cmd: list[str], checkpoint: Path, delay: float, env: dict[str, str],
                        timeout: float = 120.0, **popen) -> subprocess.Popen:
    """Run cmd; return once it has (re)written `checkpoint` and `delay` more seconds have passed,
    or once it has ended (the caller checks `poll()`)."""
    before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
    proc = subprocess.Popen(cmd, env=env, **popen)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists() and checkpoint.stat().st_mtime_ns != before:
            break
        time.sleep(0.002)
    time.sleep(delay)
    return proc
