"""What `circuit` and `circuit-data` tell a person while they run: one line per phase on stderr
(loading the model, computing means, integrated gradients, training masks at lambda X, ...) and a
tqdm bar that moves per batch or step, both off with --quiet. A long phase that printed nothing
looked hung (45 minutes of silence on a slow CPU)."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """Phase lines and bars on stderr; silent when not `enabled`."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started = time.time()

    def phase(self, message: str) -> None:
        """One line naming what starts now, with the seconds since the command began."""
        if self.enabled:
            tqdm.write(f"[{time.time() - self.started:7.1f} s] {message}", file=sys.stderr)

    def bar(self, total: int, desc: str, unit: str = "batch") -> tqdm:
        """A bar of `total` units; update(1) per batch or step. Closed bars leave no line behind
        (the phase lines are the record)."""
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.enabled, dynamic_ncols=True,
                    file=sys.stderr, leave=False, mininterval=0.5)


QUIET = Progress(False)
"""For callers (tests, the Python API) that want no output."""
