"""Running an experiment's stages in order, each as its own `routesae` process, and knowing what is
finished: state.json records, per stage, the key of the settings it ran with and whether it ended.

- a stage that ended with the same key (and whose output is there) is not run again;
- a stage whose key changed (its own settings or a stage it reads) loses its output and runs again,
  with one line saying why; the stages after it follow from their keys;
- a stage that was interrupted runs again: harvest and fit continue where they stopped (their own
  resume), the others start over on a clean folder.

Each stage is a child process (what a user would type, so the experiment adds no work of its own
and frees each stage's memory), killed with the experiment (Linux: PR_SET_PDEATHSIG), and one
experiment folder is run by one process at a time (an flock on its lock file).
"""

from __future__ import annotations

import ctypes
import fcntl
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from routesae.atomic_files import write_json
from routesae.errors import RouteSAEError
from routesae.reproduce.config import fingerprint
from routesae.reproduce.stages import Stage

STATE = "state.json"


class StageKey(NamedTuple):
    """What a stage's output depends on, and its hash."""

    key: str
    """fingerprint of `inputs`."""
    inputs: dict[str, Any]
    """Its arguments (paths relative to the experiment folder) and the keys of the stages it reads."""


def stage_keys(stages: list[Stage], out: Path) -> dict[str, StageKey]:
    """Each stage's key: its arguments with the experiment folder written as $OUT (a moved folder
    keeps its keys), and the keys of the stages it reads, so a change flows downstream."""
    keys: dict[str, StageKey] = {}
    root = str(out)
    for s in stages:
        inputs = {"command": s.command, "args": [a.replace(root, "$OUT") for a in s.args],
                  "needs": {n: keys[n].key for n in s.needs}}
        keys[s.name] = StageKey(fingerprint(inputs), inputs)
    return keys


def read_state(out: Path) -> dict[str, Any]:
    import json

    path = out / STATE
    if not path.exists():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise RouteSAEError(f"{path} is damaged (not JSON); remove it to rerun every stage") from None


def is_done(state: dict[str, Any], stage: Stage, key: StageKey) -> bool:
    rec = state["stages"].get(stage.name)
    return bool(rec and rec.get("status") == "done" and rec.get("key") == key.key and stage.out.exists())


def why_rerun(rec: dict[str, Any] | None, key: StageKey) -> str:
    """The line that says why a stage runs (again)."""
    if rec is None:
        return "starting"
    if rec.get("key") == key.key:
        return "resuming (interrupted)" if rec.get("status") == "running" else "its output is gone; running again"
    old = rec.get("inputs") or {}
    changed = [n for n, k in key.inputs["needs"].items() if old.get("needs", {}).get(n) != k]
    if changed:
        return f"recomputing: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed"
    before, after = old.get("args", []), key.inputs["args"]
    diff = [a for a in after if a not in before] + [f"-{a}" for a in before if a not in after]
    return f"recomputing: its settings changed ({' '.join(diff[:6]) or 'command'})"


@contextmanager
def experiment_lock(out: Path) -> Iterator[None]:
    """One process per experiment folder; a second is refused in one line."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RouteSAEError(f"{out} is being run by another `routesae reproduce`; wait for it or stop it") from None
        yield


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the experiment process dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _remove(path: Path, out: Path) -> None:
    if out.resolve() not in path.resolve().parents:
        raise RouteSAEError(f"refusing to remove {path}: outside the experiment folder {out}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def stage_command(stage: Stage) -> list[str]:
    args = stage.resolve(stage.args) if stage.resolve is not None else stage.args
    return [sys.executable, "-m", "routesae", stage.command, *args]


class StageTime(NamedTuple):
    name: str
    kind: str
    seconds: float
    ran: bool
    """False: finished before, not run now."""


def run_stages(stages: list[Stage], out: Path, log: Callable[[str], None] = print,
               on_done: Callable[[Stage, float], None] | None = None) -> list[StageTime]:
    """Run what is not finished, in order; a failing stage stops the experiment with one line.
    on_done(stage, seconds) after each stage that ran to its end."""
    keys = stage_keys(stages, out)
    state = read_state(out)
    times: list[StageTime] = []
    total = len(stages)
    for i, stage in enumerate(stages, 1):
        key = keys[stage.name]
        rec = state["stages"].get(stage.name)
        if is_done(state, stage, key):
            times.append(StageTime(stage.name, stage.kind, float(rec.get("seconds", 0.0)), False))
            continue
        reason = why_rerun(rec, key)
        if stage.out.exists() and not (rec and rec.get("key") == key.key and stage.resumable):
            _remove(stage.out, out)
        stage.out.parent.mkdir(parents=True, exist_ok=True)
        log(f"[{i}/{total}] {stage.name}: {reason}")
        state["stages"][stage.name] = {"key": key.key, "inputs": key.inputs, "status": "running",
                                       "started": _now(), "seconds": None, "code": code_version()}
        write_json(out / STATE, state)
        started = time.perf_counter()
        seconds = _run(stage)
        state["stages"][stage.name].update(status="done", finished=_now(), seconds=round(seconds, 2))
        write_json(out / STATE, state)
        log(f"[{i}/{total}] {stage.name}: done in {_duration(seconds)}")
        if on_done is not None:
            on_done(stage, seconds)
        times.append(StageTime(stage.name, stage.kind, time.perf_counter() - started, True))
    return times


def code_version() -> str | None:
    """The routesae code a stage runs: its git commit, '+dirty' with uncommitted changes to tracked
    files; None outside a git checkout (an installed release: its version is in the provenance)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _run(stage: Stage) -> float:
    started = time.perf_counter()
    command = stage_command(stage)
    if stage.stdout_to is not None:
        from routesae.atomic_files import atomic_open

        with atomic_open(stage.stdout_to, "w") as handle:
            code = subprocess.call(command, stdout=handle, preexec_fn=_die_with_parent)
            if code != 0:
                raise _failed(stage, code)
    else:
        code = subprocess.call(command, preexec_fn=_die_with_parent)
        if code != 0:
            raise _failed(stage, code)
    return time.perf_counter() - started


def _failed(stage: Stage, code: int) -> RouteSAEError:
    how = f"was killed by signal {-code}" if code < 0 else f"failed (exit {code})"
    return RouteSAEError(f"stage '{stage.name}' {how}; its output is above; run the same command again to resume "
                         f"(`routesae {stage.command} ...` is what it ran)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
