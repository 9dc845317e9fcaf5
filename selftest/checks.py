"""The self-test's three checks of a device against a CPU float32 reference computed in the same
run: stored activations, splice KL, fit loss. Each returns a `Check` with its measured value, its
tolerance, why that tolerance, and whether it held."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

# --- tolerances --------------------------------------------------------------------------------------
ACT_TOLERANCE = {"float32": 2.0 ** -8, "float16": 2.0 ** -6, "bfloat16": 2.0 ** -4}
"""Largest relative RMS error (over a layer's non-special positions) of the stored activations
against a CPU float32 forward, by the dtype the harvest's forward ran in. float32: storing in bf16
rounds each value by at most half a unit (2^-9 relative), so one unit (2^-8) leaves room for the
two devices' float32 kernels summing in other orders (~1e-6). float16 / bfloat16: every matmul and
norm of the device's forward also rounds to 11 / 8 bits, and those errors pile up over the blocks
before a layer; 2^-6 / 2^-4 (16 units of each format) allow that while a real fault (another
context's tokens, another layer, a garbled batch) is off by a large fraction of the activation."""
KL_TOLERANCE = {"float32": (1e-2, 1e-5), "float16": (0.1, 0.01), "bfloat16": (0.1, 0.01)}
"""(relative, absolute nats) allowed between the device's splice KL per token of one batch and the
CPU float32 reference's, by the dtype the device's splice ran in. float32: the stored (bf16-rounded)
activations the device's clean run may start from and kernel order move the KL by far less than 1%.
bf16 / fp16: both the clean and the spliced logits round at every layer; a tenth of the KL, plus
0.01 nats for an SAE that barely changes the model (whose KL is then mostly that rounding)."""


class Check(NamedTuple):
    """One check of the device against the reference."""

    name: str
    """What is compared."""
    measured: float | None
    """The figure compared (None: it could not be computed; the check then fails)."""
    tolerance: str
    """The rule the figure must meet, in words with its numbers."""
    held: bool
    """Whether it did."""
    why: str
    """Why that tolerance (or why nothing was measured)."""
    detail: dict[str, Any]
    """Per layer / per SAE figures behind `measured`."""

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


def failed(name: str, why: str) -> Check:
    """A check that could not run (its stage failed): it does not hold."""
    return Check(name, None, "-", False, why, {})


# --- (a) stored activations ----------------------------------------------------------------------------
def relative_error(stored: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor) -> float:
    """||stored - reference|| / ||reference|| over the positions `keep` marks (float64 sums).

    stored, reference: [..., positions, d]; keep: bool [..., positions]."""
    s, r = stored[keep].double(), reference[keep].double()
    norm = r.norm().item()
    if not math.isfinite(norm) or norm == 0:
        return math.inf
    err = (s - r).norm().item()
    return err / norm if math.isfinite(err) else math.inf


ACT_TOLERANCE_WHY = {
    "float32": "the store rounds to bf16 (at most 2^-9 relative); one bf16 unit (2^-8) leaves room for float32 "
               "kernels summing in another order",
    "float16": "the device's fp16 forward rounds every op to 11 bits and the errors add up over the blocks: "
               "16 fp16 units; a wrong context or layer is off by a large fraction",
    "bfloat16": "the device's bf16 forward rounds every op to 8 bits and the errors add up over the blocks: "
                "16 bf16 units (2^-4); a wrong context or layer is off by a large fraction",
}
"""The same, in the words each check reports."""


def activation_check(stored: dict[int, torch.Tensor], reference: dict[int, torch.Tensor], keep: torch.Tensor,
                     compute_dtype: str) -> Check:
    """(a): each stored layer of the first harvest batch against the CPU float32 forward's hidden
    state there; measured is the worst layer's relative RMS error."""
    errors = {layer: relative_error(stored[layer], reference[layer], keep) for layer in stored}
    worst = max(errors.values())
    tol = ACT_TOLERANCE.get(compute_dtype, ACT_TOLERANCE["bfloat16"])
    return Check(
        "harvest: first batch's stored activations vs a CPU float32 forward",
        worst, f"relative RMS error <= {tol:.4g} in every layer (forward in {compute_dtype})", worst <= tol,
        ACT_TOLERANCE_WHY[compute_dtype if compute_dtype in ACT_TOLERANCE_WHY else "bfloat16"],
        {"per_layer": {str(k): v for k, v in errors.items()}, "positions": int(keep.sum())},
    )


# --- (b) splice KL -----------------------------------------------------------------------------------
def kl_check(device_kl: dict[str, float], reference_kl: dict[str, float], compute_dtype: str) -> Check:
    """(b): per SAE, the device's splice KL per token of one batch against the CPU float32
    reference's; measured is the largest |device - reference| as a share of the allowance."""
    rel, absolute = KL_TOLERANCE.get(compute_dtype, KL_TOLERANCE["bfloat16"])
    per_sae: dict[str, Any] = {}
    worst = 0.0
    for name, ref in reference_kl.items():
        dev = device_kl.get(name, math.nan)  # an SAE eval did not report: no figure, the check fails
        allowed = rel * abs(ref) + absolute
        share = abs(dev - ref) / allowed if math.isfinite(dev) and math.isfinite(ref) else math.inf
        per_sae[name] = {"device_kl_per_token": dev, "reference_kl_per_token": ref, "abs_diff": abs(dev - ref),
                        "allowed": allowed}
        worst = max(worst, share)
    held = bool(reference_kl) and worst <= 1.0
    return Check(
        "eval --splice: KL per token of one batch, device vs CPU float32",
        worst, f"|device - reference| <= {rel:g} x reference + {absolute:g} nats for every SAE (measured: the "
               f"largest difference as a share of that allowance; splice in {compute_dtype})", held,
        "float32 both sides: only the bf16-rounded stored prefix and kernel order differ" if compute_dtype == "float32"
        else f"{compute_dtype} rounds the clean and the spliced logits at every layer: a tenth of the KL, plus 0.01 "
             "nats for an SAE that barely changes the model",
        {"per_sae": per_sae},
    )


# --- (c) fit loss ------------------------------------------------------------------------------------
LOSS_CHECK = "fit: loss goes down (its reconstruction term, NormMSE: last vs first line of metrics.jsonl)"


def logged_losses(metrics: Path) -> list[float]:
    """The reconstruction loss (`nmse`) of every line of a fit's metrics.jsonl, in order. Not the
    total `loss`: for the coders without a k it adds a sparsity penalty whose coefficient is steered
    towards the target L0, and it rose while NormMSE fell (JumpReLU on SmolLM2: 1.22 -> 3.89,
    NormMSE 0.91 -> 0.53)."""
    out = []
    for line in metrics.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "nmse" in row:
                out.append(float(row["nmse"]))
    return out


def loss_check(runs: dict[str, Path]) -> Check:
    """(c): for every SAE folder, the last logged NormMSE below the first; measured is the worst
    (largest) last/first ratio."""
    per_sae: dict[str, Any] = {}
    worst = 0.0
    for name, folder in runs.items():
        losses = logged_losses(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
        ratio = losses[-1] / losses[0] if len(losses) >= 2 and losses[0] > 0 else math.inf
        if not math.isfinite(ratio):
            ratio = math.inf
        per_sae[name] = {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                        "logged": len(losses), "last_over_first": ratio}
        worst = max(worst, ratio)
    held = bool(runs) and worst < 1.0
    return Check(LOSS_CHECK, worst,
                 "last / first < 1 for every SAE (measured: the largest ratio)", held,
                 "a fit that learns lowers its loss from the first logged steps; two lines at least are needed",
                 {"per_sae": per_sae})
