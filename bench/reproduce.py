"""What `routesae reproduce` adds to the work of its stages: the experiment run by hand against the
same experiment run by reproduce, side by side in one run.

    python bench/reproduce.py [EXPERIMENT] [--rounds 1]

EXPERIMENT is a preset or a TOML file (default `demo`, about 10 minutes on 2 cores; a tiny model
folder works too: see tests/test_reproduce.py's TINY). By hand: each stage's command exactly as
reproduce would run it (`python -m routesae COMMAND ARGS`, one after the other, into folder A);
then `routesae reproduce EXPERIMENT --out B` from scratch. Prints the sum of the hand-run stages'
wall times, reproduce's wall time (its own start, checks, bookkeeping and report included), and
their ratio; the target is within 5% (ratio <= 1.05). --rounds alternates the two and prints
each round, so a machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def by_hand(spec: str, out: Path) -> float:
    """Every stage's command, in order, timed one by one; -> the sum of their wall times."""
    from routesae.reproduce.config import load_experiment
    from routesae.reproduce.runner import stage_command
    from routesae.reproduce.stages import build_stages

    total = 0.0
    for stage in build_stages(load_experiment(spec), out):
        stage.out.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if stage.stdout_to is not None:
            with open(stage.stdout_to, "w") as handle:
                subprocess.run(stage_command(stage), stdout=handle, stderr=subprocess.DEVNULL, check=True)
        else:
            subprocess.run(stage_command(stage), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        total += time.perf_counter() - started
    return total


def with_reproduce(spec: str, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "routesae", "reproduce", spec, "--out", str(out)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", default="demo")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-reproduce-") as tmp:
            hand = by_hand(args.experiment, Path(tmp) / "hand")
            repro = with_reproduce(args.experiment, Path(tmp) / "reproduce")
        print(f"round {i + 1}: stages by hand {hand:.1f} s (sum of their wall times), reproduce {repro:.1f} s, "
              f"reproduce / by hand = {repro / hand:.3f}", flush=True)


if __name__ == "__main__":
    main()
