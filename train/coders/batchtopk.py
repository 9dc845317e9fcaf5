"""BatchTopK (Bussmann et al. 2024, arXiv 2412.06410): in training, the k * n largest activations
of a whole batch of n tokens are kept, so tokens that need more latents get more; at inference a
single threshold, estimated during training, replaces the batch, so a token's code no longer
depends on the tokens beside it (saved as a JumpReLU with that threshold for every latent).
The training step is TopK's sparse kernel with a batch-wide selection (sparse_ops)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from routesae.train.coders.base import Coder, CoderOutput, Latents, jump, no_penalty
from routesae.train.coders.topk import TopKCoder
from routesae.train.distributed import current_shard, global_min
from routesae.train.sparse_ops import topk_sae_forward

THRESHOLD_RATE = 0.05
"""Weight of each batch in the running estimate of the inference threshold. The batches' threshold
falls as training goes on; at 0.01 the estimate lagged it by about 15% at the end of a few hundred
steps (inference L0 about 27 for k 32); at 0.05 it averages the last ~20 batches, trained at the
decayed learning rate, so the lag is gone and the noise of ~20 batches of k * n values is small."""


class BatchTopKCoder(TopKCoder):
    """pre = W_enc (x - b_dec) + b_enc; training keeps the batch's top k * n of ReLU(pre);
    inference keeps pre > theta, theta the running mean of the smallest kept activation.
    Weights, their start and their constraint are TopK's."""

    name = "batchtopk"

    def __init__(self, d_model: int, n_latents: int, k: int, generator: torch.Generator | None = None):
        super().__init__(d_model, n_latents, k, generator)
        # float64: a running mean of many batches; -1 until the first training batch sets it
        self.register_buffer("threshold_estimate", torch.tensor(-1.0, dtype=torch.float64))

    @property
    def threshold(self) -> float:
        """The inference threshold (0 before any training)."""
        return max(float(self.threshold_estimate), 0.0)

    def encode(self, x: Tensor) -> Tensor:
        return jump(self.pre_activations(x), self.threshold)

    def encode_sparse(self, x: Tensor) -> Latents:
        return Coder.encode_sparse(self, x)  # the threshold's count, not TopK's k

    def forward_train(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, k_aux: int = 0,
        sparsity_coef: float = 0.0,
    ) -> CoderOutput:
        out = topk_sae_forward(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, compute_dtype, dead,
                               k_aux, batch=True)
        self._track_threshold(out.values)
        return no_penalty(out)

    @torch.no_grad()
    def _track_threshold(self, values: Tensor) -> None:
        """Fold this training batch's smallest kept activation into the inference threshold
        (distributed: the whole batch's, the same on every rank)."""
        if not self.training:
            return
        kept = values[values > 0]
        local = float(kept.min()) if kept.numel() else math.inf
        smallest = global_min(local) if current_shard() is not None else local
        if not math.isfinite(smallest):
            return
        if self.threshold_estimate < 0:
            self.threshold_estimate.fill_(smallest)
        else:
            self.threshold_estimate.mul_(1 - THRESHOLD_RATE).add_(THRESHOLD_RATE * smallest)

    def export_tensors(self) -> dict[str, Tensor]:
        """TopK's names plus `threshold` [d_sae] (every entry the same): it loads as a JumpReLU SAE."""
        return {**super().export_tensors(), "threshold": torch.full((self.n_latents,), self.threshold)}

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            value = tensors[name]
            getattr(self, name).copy_(value.T if name == "W_enc" else value)
        self.threshold_estimate.fill_(float(tensors["threshold"][0]))
