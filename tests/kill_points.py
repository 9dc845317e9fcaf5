"""Kill points: run a routesae command that stops at a named point of its work and waits there to
be killed, so the kill-and-resume and Ctrl-C tests strike where they mean to on a busy machine as
on an idle one (no guess at how long a step takes, no race with a fit that ends first).

Run as a script, `python kill_points.py ARGS...` is `routesae ARGS...` with the point that the
environment names (KILL_POINT, one of the forms below) armed; on reaching it the process writes a
file named after its pid into the folder KILL_MARKERS and blocks (at most PAUSE_SECONDS, then it
exits, so a test that failed to kill it leaves nothing running); a script running a stage itself
calls `arm_from_env()` first. Under `torchrun ... kill_points.py`
every rank arms it; a point that only rank 0 reaches (a fit's checkpoints) pauses rank 0 alone, and
the other ranks then wait for it in their next collective.

- `checkpoint:N`: a fit, just after its Nth checkpoint (of this process) is written;
- `after-checkpoint:N+D`: a fit, D steps after its Nth checkpoint, as the next step begins;
- `in-checkpoint:N`: a fit, inside its Nth checkpoint's write: the new file is complete under its
  temporary name, not yet renamed over the old one;
- `step:N`: a fit, as step N+1 begins (N steps done);
- `harvest-record:N`: a harvest's writer, once it has written and recorded its Nth shard, before
  that shard is committed (the main thread soon waits on the writer's full queue).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POINT_ENV = "KILL_POINT"
MARKERS_ENV = "KILL_MARKERS"
PAUSE_SECONDS = 600
SCRIPT = Path(__file__).resolve()


def command(*args: str) -> list[str]:
    """The command line running `routesae ARGS...` under this script."""
    return [sys.executable, str(SCRIPT), *map(str, args)]


def markers(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, so its Python turns it into KeyboardInterrupt even
    when this suite was started with SIGINT ignored (a background job of a shell without job
    control, `nohup`), which the child would inherit and a Ctrl-C test would wait on forever."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_paused(cmd: list[str], point: str, folder: Path, env: dict[str, str], processes: int = 1,
                 timeout: float = 600.0, **popen) -> subprocess.Popen:
    """Start cmd with `point` armed; return once `processes` of its processes wait there. The
    timeout only guards against a hang: it fails the test, as does the command ending first."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in markers(folder):
        old.unlink()
    popen.setdefault("preexec_fn", _default_sigint)
    proc = subprocess.Popen(cmd, env={**env, POINT_ENV: point, MARKERS_ENV: str(folder)}, **popen)
    deadline = time.monotonic() + timeout
    while len(markers(folder)) < processes:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"{point}: the command ended (exit {proc.returncode}) before reaching it: "
                                 f"{err[-3000:]!r}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{point}: not reached in {timeout:.0f} s")
        time.sleep(0.01)
    return proc


# --- inside the command ----------------------------------------------------------------------------


def _pause(point: str) -> None:
    folder = Path(os.environ[MARKERS_ENV])
    (folder / str(os.getpid())).write_text(point)
    time.sleep(PAUSE_SECONDS)  # a signal (SIGINT: KeyboardInterrupt) ends this; SIGKILL ends all
    os._exit(99)


def _arm(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind in ("checkpoint", "after-checkpoint", "in-checkpoint", "step"):
        _arm_fit(kind, arg)
    elif kind == "harvest-record":
        _arm_harvest(int(arg))
    else:
        raise SystemExit(f"kill_points: unknown point {point!r}")


def _arm_fit(kind: str, arg: str) -> None:
    from routesae.train import checkpoint, trainer

    nth, _, later = arg.partition("+")
    n, steps_after = int(nth), int(later or 0)
    seen = {"checkpoints": 0, "at_step": None}
    real_save, real_step, real_write = trainer.Trainer.save_checkpoint, trainer.Trainer.train_step, checkpoint.atomic_write

    def save(self) -> None:
        seen["checkpoints"] += 1
        real_save(self)
        if seen["checkpoints"] == n:
            seen["at_step"] = self.step
            if kind == "checkpoint":
                _pause(f"{kind}:{arg}")

    def train_step(self, *args, **kwargs):
        if kind == "step" and self.step == n:
            _pause(f"{kind}:{arg}")
        if kind == "after-checkpoint" and seen["at_step"] is not None and self.step == seen["at_step"] + steps_after:
            _pause(f"{kind}:{arg}")
        return real_step(self, *args, **kwargs)

    def atomic_write(path, write, **kw):
        def write_then_pause(tmp):
            write(tmp)
            if kind == "in-checkpoint" and seen["checkpoints"] == n:
                _pause(f"{kind}:{arg}")

        return real_write(path, write_then_pause, **kw)

    trainer.Trainer.save_checkpoint = save
    trainer.Trainer.train_step = train_step
    checkpoint.atomic_write = atomic_write


def _arm_harvest(n: int) -> None:
    from routesae.store.zarr_store import StoreWriter

    real = StoreWriter.record_shard
    seen = {"records": 0}

    def record_shard(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen["records"] += 1
        if seen["records"] == n:
            _pause(f"harvest-record:{n}")

    StoreWriter.record_shard = record_shard


def arm_from_env() -> None:
    """Arm the point the environment names, if any (for scripts that run a stage themselves)."""
    if os.environ.get(POINT_ENV):
        _arm(os.environ[POINT_ENV])


if __name__ == "__main__":
    arm_from_env()
    from routesae.cli import main

    main(sys.argv[1:], prog_name="routesae")
