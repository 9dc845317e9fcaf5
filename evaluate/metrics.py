"""Pure metric functions: reconstruction (NormMSE, FVU) and next-token (KL, CE, loss recovered).

Everything here takes tensors and returns tensors or floats; no model, no store. Sums that run over
many batches are kept in float64 by the accumulators, so millions of tokens add up without drift.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch


def normmse_per_token(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """||x_hat - x||^2 / ||x||^2 per row ([n, d] -> [n]), the training loss's per-token term."""
    x, x_hat = x.float(), x_hat.float()
    return (x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(eps)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum_d Var(x_d - x_hat_d) / sum_d Var(x_d) over rows of [n, d]."""
    acc = VarianceAccumulator(x.shape[-1], device=x.device)
    acc.add(x, x_hat)
    return acc.fvu()


class VarianceAccumulator:
    """Streams the per-dimension first and second moments of x and of the residual x - x_hat.

    Var is E[v^2] - E[v]^2 per dimension in float64; activations have O(1..1e3) entries, far from
    where that formula loses precision in float64."""

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.sx = torch.zeros(d, dtype=torch.float64, device=device)
        self.sxx = torch.zeros(d, dtype=torch.float64, device=device)
        self.sr = torch.zeros(d, dtype=torch.float64, device=device)
        self.srr = torch.zeros(d, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x = x.double()
        r = x - x_hat.double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sxx += x.pow(2).sum(0)
        self.sr += r.sum(0)
        self.srr += r.pow(2).sum(0)

    def fvu(self) -> float:
        if self.n == 0:
            return math.nan
        var_x = (self.sxx / self.n - (self.sx / self.n).pow(2)).sum()
        var_r = (self.srr / self.n - (self.sr / self.n).pow(2)).sum()
        return float(var_r / var_x) if var_x > 0 else math.nan


def run_sums(values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Sums of consecutive runs of rows: values [sum(counts), ...] -> [len(counts), ...] (an empty
    run sums to 0). Per-context sums are taken this way rather than by index_add_, whose additions
    on a GPU come in an arbitrary order: the same run would not give the same sums bit for bit."""
    return torch.stack([part.sum(0) for part in values.split(counts)])


class ContextMoments:
    """FVU, streamed per context. Each context's shares of its numerator and denominator are the
    sums over its tokens of ||r - mean(r)||^2 and ||x - mean(x)||^2 (r = x - x_hat), with the means
    FVU's variances take, the whole run's: summed over all contexts they are n * sum_d Var(r_d) and
    n * sum_d Var(x_d), and `fvu` is their ratio.

    The means are known only at the end, so each context's token count, vector sums of x and r and
    sums of their squared norms are kept (float64, on the CPU: 2 * n_contexts * d * 8 bytes), and
    sum ||v - m||^2 = sum ||v||^2 - 2 m . sum v + n ||m||^2 is formed in `shares`."""

    def __init__(self, n_contexts: int, d: int):
        self.n = np.zeros(n_contexts)
        self.sx = np.zeros((n_contexts, d))
        self.sr = np.zeros((n_contexts, d))
        self.sxx = np.zeros(n_contexts)
        self.srr = np.zeros(n_contexts)

    def add(self, first: int, n: np.ndarray, sx: np.ndarray, sr: np.ndarray, sxx: np.ndarray, srr: np.ndarray) -> None:
        """Sums over contexts first.. (per-context arrays of a batch, float64)."""
        rows = slice(first, first + len(n))
        self.n[rows] += n
        self.sx[rows] += sx
        self.sr[rows] += sr
        self.sxx[rows] += sxx
        self.srr[rows] += srr

    def shares(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (sse, sst) [n_contexts] float64 (NaN with no token at all)."""
        total = self.n.sum()
        if total == 0:
            return np.full_like(self.n, np.nan), np.full_like(self.n, np.nan)

        def centred(s: np.ndarray, ss: np.ndarray) -> np.ndarray:
            mean = s.sum(0) / total
            return ss - 2 * (s @ mean) + self.n * (mean @ mean)

        return centred(self.sr, self.srr), centred(self.sx, self.sxx)

    def fvu(self) -> float:
        """sum_d Var(r_d) / sum_d Var(x_d) over all the tokens: the ratio of the shares' sums."""
        sse, sst = self.shares()
        total = sst.sum()
        return float(sse.sum() / total) if total > 0 else math.nan


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the last dimension, whatever dtype the model computed logits in."""
    return torch.log_softmax(logits.float(), dim=-1)


def kl_per_position(logp_ref: torch.Tensor, logp_other: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) in nats per row, from log-probabilities [n, vocab] -> [n].

    Terms with p_ref = 0 contribute 0 (xlogy convention), so -inf log-probabilities are harmless."""
    p_ref = logp_ref.exp()
    # where p_ref underflows to 0 the product must be 0 even if logp_other is -inf
    return torch.where(p_ref > 0, p_ref * (logp_ref - logp_other), torch.zeros_like(p_ref)).sum(-1)


class LogitStats(NamedTuple):
    """What the metrics need of one set of float32 logits [n, vocab]."""

    lse: torch.Tensor
    """[n] log-sum-exp over the vocabulary (log of the softmax's normalizer)."""
    probs: torch.Tensor | None
    """[n, vocab] softmax, when asked for (the reference distribution of a KL)."""


def logit_stats(logits: torch.Tensor, with_probs: bool = False, out: torch.Tensor | None = None) -> LogitStats:
    """log-sum-exp (and, if asked, the softmax) of float32 logits [n, vocab]; out: where to put the
    softmax (a float32 tensor of logits' shape), else it is allocated.

    One softmax pass gives both: the top token's probability is exp(0) / S, so
    lse = max + log S = max - log(max p). On a CPU that is ~3x faster than torch.logsumexp, whose
    float32 sum is finer (5e-7 against 2e-6 over a 49k vocabulary, logits of scale 3): far below
    what any CE or KL figure here needs."""
    probs = torch.softmax(logits, dim=-1, out=out) if out is not None else torch.softmax(logits, dim=-1)
    lse = logits.amax(dim=-1).sub_(probs.amax(dim=-1).log_())
    return LogitStats(lse, probs if with_probs else None)


def expm1_(d: torch.Tensor, e: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """exp(d) - 1 into `out`, to float32 precision even for tiny d; d is overwritten, e is scratch
    (all float32, one shape).

    torch.expm1 is not vectorized on CPUs (about 15x slower than torch.exp here), so this is Kahan's
    form from exp and log: with e = exp(d) rounded, exp(d) = e * exp(d - log e), hence
    exp(d) - 1 ~= (e - 1) + e * (d - log e). Near d = 0, e - 1 is exact and the second term restores
    what rounding e lost (max relative error ~2e-7 against 6e-8 for torch.expm1). d = 0 gives
    exactly 0; d = +inf or overflow gives NaN (the caller treats non-finite rows apart)."""
    d.clamp_(min=-80.0)  # exp(-80) is still a normal float (log of a denormal or 0 is not safe); expm1 = -1 there
    torch.exp(d, out=e)
    d.sub_(torch.log(e, out=out))
    torch.sub(e, 1.0, out=out)
    return out.addcmul_(e, d)


def kl_from_logits(
    ref_logits: torch.Tensor, ref: LogitStats, logits: torch.Tensor, work: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(ref || other) per row and the other logits' log-sum-exp, from raw float32 logits [n, vocab].

    With delta = z_ref - z and p = softmax(z_ref):
        lse - lse_ref = log sum_v p_v exp(-delta_v) = log1p(sum_v p_v expm1(-delta_v))
        KL = sum_v p_v delta_v + (lse - lse_ref)
    Every term is of the size of delta, so a small KL never comes out of the difference of two
    large numbers (as it would from log-softmaxes, whose float32 rounding is ~1e-6 of the logits'
    size), and identical logits give exactly 0. Rows where this overflows (far-apart
    distributions) or meets -inf logits are computed directly instead.
    logits may be bf16 (read once, promoted); work: float32 [3, n, vocab] to work in (saves
    allocations); logits is kept.
    -> (kl [n], lse [n])."""
    w = work if work is not None else torch.empty(3, *logits.shape, device=logits.device)
    # d = z - z_ref = -delta, so that expm1(-delta) needs no negation pass; logits may be in a lower
    # precision (bf16): the subtraction promotes it to float32 as it reads it
    d = torch.sub(logits, ref_logits, out=w[0])
    pd = -torch.linalg.vecdot(ref.probs, d)
    pe = torch.linalg.vecdot(ref.probs, expm1_(d, w[1], w[2]))
    # The one-pass form is exact near the reference. Where the normalizer falls below half
    # (pe < -0.5), 1 + pe cancels and the softmax's own float32 rounding would dominate what is
    # left: there the sum sum_v p_v exp(-delta_v) itself (exp(-delta) is still in w[1]) is as
    # precise as a log-sum-exp, and such a row's KL is far from 0 anyway. Rows where exp overflowed
    # (logits far apart) come out non-finite and take the direct log-sum-exp below.
    log_ratio = torch.log1p(pe)
    near = pe >= -0.5
    if not bool(near.all()):
        log_ratio = torch.where(near, log_ratio, torch.linalg.vecdot(ref.probs, w[1]).log_())
    far = ~torch.isfinite(log_ratio)
    if bool(far.any()):
        log_ratio[far] = torch.logsumexp(logits[far].float(), dim=-1) - ref.lse[far]
    kl = pd + log_ratio
    lse = ref.lse + log_ratio
    bad = ~(torch.isfinite(kl) & torch.isfinite(lse))
    if bool(bad.any()):  # -inf logits (masked tokens): p_ref = 0 terms contribute 0
        other = logits[bad].float()
        lse[bad] = torch.logsumexp(other, dim=-1)
        kl[bad] = kl_per_position(ref_logits[bad] - ref.lse[bad, None], other - lse[bad, None])
    return kl, lse


def ce_from_logits(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per row, lse - z[target]."""
    return lse - logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def ce_per_position(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy -log p(target) per row: logp [n, vocab], targets [n] -> [n]."""
    return -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE(zero) - CE(spliced)) / (CE(zero) - CE(clean)): 1 for a perfect splice, 0 for zero-ablation."""
    denom = ce_zero - ce_clean
    if denom == 0:
        return math.nan
    return (ce_zero - ce_spliced) / denom


def l0(latents: torch.Tensor) -> torch.Tensor:
    """Number of non-zero latents per row: [n, n_latents] -> [n]."""
    return (latents != 0).sum(-1)
