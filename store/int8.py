"""8-bit storage of activations: int8 values with one float32 scale per token (absmax / 127).

A token's row x is stored as q = round(x / s) with s = max|x| / 127, read back as q * s in the
model's dtype. On SmolLM2's residual stream this loses about 8e-4 of a row's squared norm
(cache_schema.md, "8-bit storage"); scales clipped below the absmax (k x the row's RMS) lose more
at every k measured, since the outlier channels they clip carry much of the norm.
Special tokens (BOS and the like, whose rows are huge and few) are kept exact, in their own array.
"""

from __future__ import annotations

import torch

QMAX = 127


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (q int8 [..., d], scale float32 [...]).

    The scale is rounded to x's dtype (bf16, fp16) first: q * scale is then exact in float32
    (7 + 8 significant bits), so every reader, in float32 or in the model's dtype, gets the same
    values after one rounding to the model's dtype."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / QMAX).to(x.dtype).float()
    # an all-zero row has scale 0: divide by 1 instead (q is 0 either way); a scale rounded down
    # can put the largest value a hair past 127: clamped
    q = torch.round(xf / torch.where(scale > 0, scale, 1).unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """q int8 [..., d], scale float32 [...] -> q * scale in `dtype` (into `out` when given).

    Computed in `dtype` directly (the product is exact, see quantize), ~4x faster than in float32."""
    if out is None:
        out = torch.empty(q.shape, dtype=dtype)
    return out.copy_(q).mul_(scale.to(dtype).unsqueeze(-1))  # int8 -> dtype is exact; in place, no temporary
