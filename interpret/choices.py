"""The values the interpret stage's commands offer (rules, thresholds, protocols, reductions, steering
edits, the contexts defaults), apart from the code behind them, so `routesae X --help` loads no torch.

The stage modules (contexts.py, run_interpret.py, diff.py, steering.py) import these from here, so
each is defined once."""

from __future__ import annotations

RULES = {"paper": 4, "paper-code": 5}
"""Interpretable-feature rules: the RouteSAE paper's (at least 4 contexts) and its code's (at least 5)."""
PAPER_THRESHOLD = 15.0
"""The paper's activation threshold, on its models' scale (inputs normalized per token, d_model 2048-3072)."""
CONTEXTS_DEFAULTS = {"top": 20, "left": 24, "right": 8, "quantiles": 10, "per_quantile": 2, "samples": 20,
                     "negatives": 20}
"""The defaults `routesae contexts --help` shows, and ContextsConfig's own."""

PROTOCOLS = ("paper", "detection", "fuzzing")
"""The judge's protocols, in the order they run: the RouteSAE paper's, delphi's detection and fuzzing."""

REDUCTIONS = ("mean", "max", "last")
"""How `routesae diff` reduces a prompt's per-token activations of a latent to one number."""

MODES = ("set", "add", "mul", "zero")
"""Steering edits: clamp to a value, add it, multiply by it, or ablate."""
WHERES = ("all", "active")
"""Where an edit applies: every position, or only where the latent already fires."""
POSITIONS = ("all", "prompt", "generated")
"""Which tokens an edit applies to."""
