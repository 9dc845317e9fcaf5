"""What every architecture is: a coder (coders/: how the code is made sparse) behind a way of
reading the model's layers (this folder: which layers, and how they become the coder's input),
plus the registry that maps an architecture's name to its class.

Spaces, as the docstrings use them:
- model space: activations as the model produced them (what the store holds);
- normalized space: after the SAE's normalization (see normalize.py); for RouteSAE the coder's
  input is additionally the routed mixture (hard: p * x_norm of the chosen layer).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import abc

import torch
from torch import Tensor, nn

from routesae.train.coders import CoderOutput, Latents, build_coder
from routesae.train.config import SAEConfig
from routesae.train.normalize import apply_normalization
from routesae.train.sparse_ops import fired_latents

ARCHITECTURES: dict[str, type["SAE"]] = {}


def register(cls: type["SAE"]) -> type["SAE"]:
    """Class decorator: make an architecture available by its `arch` name."""
    ARCHITECTURES[cls.arch] = cls
    return cls


class TrainOutput(NamedTuple):
    """One training forward: the loss to minimise and what the trainer logs."""

    loss: Tensor
    """Scalar: NormMSE plus the coder's penalty (sparsity, auxiliary terms) and the weighted AuxK term."""
    nmse: Tensor
    """Scalar, detached: mean ||x_hat - x||^2 / ||x||^2 in the coder's input space."""
    aux_loss: Tensor
    """Scalar, detached: the AuxK NormMSE (0 when no latent is dead)."""
    l0: Tensor
    """Scalar, detached: mean number of non-zero latents per token."""
    fired: Tensor
    """[n_latents] bool: latents that were non-zero on some token of the batch."""
    extra: dict[str, Tensor]
    """Architecture-specific detached statistics (e.g. RouteSAE's share of tokens per layer, a
    coder's penalty)."""


def normalized_mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """mean over tokens of ||x_hat - x||^2 / ||x||^2."""
    return ((x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-12)).mean()


class SAE(nn.Module, abc.ABC):
    """Base class of the architectures. Subclasses set `arch` (and `coder_name`) and implement
    `coder_input` and `reconstruct` (and `training_loss` where the coder's input is not all it
    needs, as RouteSAE's routing statistics); weights live in `self.coder` (+ any routing parameters)."""

    arch: ClassVar[str]
    coder_name: ClassVar[str] = "topk"
    """The coder (coders/) that makes the code sparse."""
    multi_layer: ClassVar[bool] = False
    """False: reads one layer, input [..., d_model]; True: reads the routed layers, [..., n_layers, d_model]."""

    def __init__(self, config: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        """The SAEConfig the SAE was built from (saved as config.json)."""
        self.coder = build_coder(self.coder_name, self.coder_width(config), config.n_latents, config.k, generator,
                                 **self.coder_options(config))
        scale = config.dataset_scale if config.normalization == "dataset" else None
        if config.normalization == "dataset" and (scale is None or len(scale) != len(config.layers)):
            raise ValueError("dataset normalization needs one scale per layer")
        # [n_layers, 1], broadcast over a stack of layers ([n, n_layers, d]) or one layer ([n, d]).
        self.register_buffer(
            "dataset_scale", torch.tensor(scale if scale else [1.0] * len(config.layers)).view(-1, 1), persistent=False
        )

    @classmethod
    def coder_width(cls, config: SAEConfig) -> int:
        """Width of the vectors the coder encodes (d_model; a crosscoder's are all its layers side by side)."""
        return config.d_model

    @classmethod
    def coder_options(cls, config: SAEConfig) -> dict[str, Any]:
        """The coder's own settings (Matryoshka's prefixes; a crosscoder's per-layer decoder blocks)."""
        return {"prefixes": config.prefixes} if config.prefixes is not None else {}

    @classmethod
    def coder_class(cls) -> type:
        """This architecture's coder class (coders/): what it says of its sparsity (fixed_l0, ...)."""
        from routesae.train.coders import CODERS

        return CODERS[cls.coder_name]

    # --- shared helpers --------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """hidden_states indices this SAE reads (in the order of the input's layer dimension)."""
        return list(self.config.layers)

    @property
    def device(self) -> torch.device:
        return self.coder.W_enc.device

    def normalize_input(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Model space -> (x_norm, mean, std) float32 on the SAE's device, with x = x_norm * std + mean."""
        x = x.to(self.device)
        scale = self.dataset_scale if x.dim() == 3 else self.dataset_scale[0]
        return apply_normalization(x, self.config.normalization, scale)

    def _train_output(
        self, out: CoderOutput, target: Tensor, dead: Tensor | None, auxk_coef: float, extra: dict[str, Tensor]
    ) -> TrainOutput:
        nmse = normalized_mse(out.x_hat, target)
        loss = nmse + out.penalty  # 0 for TopK, BatchTopK
        if self.coder.has_penalty:
            extra = {**extra, "penalty": out.penalty.detach()}
        aux = torch.zeros((), device=target.device)
        if out.aux_hat is not None and dead is not None:
            # AuxK (OpenAI): the dead latents learn to explain what the live ones missed.
            residual = (target - out.x_hat).detach()
            aux = normalized_mse(out.aux_hat, residual)
            k_aux = self.config.d_model // 2
            weight = min(int(dead.sum()) / k_aux, 1.0)
            loss = loss + auxk_coef * weight * aux
        if out.values is None:  # a dense coder's: its active mask, or its counts and fired latents
            # mean L0 = all active entries / tokens; count_nonzero is ~10x faster than a bool sum on a CPU
            l0 = out.l0.detach().mean() if out.l0 is not None else (
                torch.count_nonzero(out.active).float() / out.active.shape[0])
            fired = out.fired if out.fired is not None else out.active.any(0)
            return TrainOutput(loss, nmse.detach(), aux.detach(), l0, fired, extra)
        active = out.values > 0
        fired = fired_latents(out.indices, active, self.config.n_latents)
        return TrainOutput(loss, nmse.detach(), aux.detach(), active.sum(-1).float().mean(), fired, extra)

    def _check_input(self, x: Tensor, n_layers: int | None) -> None:
        want = (self.config.d_model,) if n_layers is None else (n_layers, self.config.d_model)
        if tuple(x.shape[1:]) != want or x.dim() != len(want) + 1:
            raise ValueError(f"{self.arch} SAE expects activations [n, {', '.join(map(str, want))}], got {list(x.shape)}")

    # --- any leading dimensions ------------------------------------------------------------------
    # The public methods take [..., d_model] (or [..., n_layers, d_model]) as SAELens's do: the
    # leading dims are flattened into rows, the architecture works on [n, ...] as it always has,
    # and the results get the leading dims back. A [n, ...] input is reshaped to itself (a view),
    # so its results are exactly what they were.
    @property
    def input_tail(self) -> tuple[int, ...]:
        """Trailing dims of an input: (d_model,) on one layer, (n_layers, d_model) for multi-layer SAEs."""
        d = self.config.d_model
        return (len(self.config.layers), d) if self.multi_layer else (d,)

    def _flatten(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """[*lead, *input_tail] -> ([n, *input_tail], lead)."""
        tail = self.input_tail
        cut = x.dim() - len(tail)
        if cut < 0 or tuple(x.shape[cut:]) != tail:
            want = ", ".join(map(str, tail))
            raise ValueError(f"{self.arch} SAE expects activations [..., {want}], got {list(x.shape)}")
        lead = tuple(x.shape[:cut])
        return x.reshape(-1, *tail), lead

    @staticmethod
    def _unflatten(t: Tensor, lead: tuple[int, ...]) -> Tensor:
        """A per-row result [n, ...] back under the input's leading dims: [*lead, ...]."""
        return t.reshape(*lead, *t.shape[1:])

    def _codes_per_token(self) -> tuple[int, ...]:
        """Codes one input row makes, as dims: () (one), MLSAE (n_layers,)."""
        return ()

    def _codes_out(self, t: Tensor, lead: tuple[int, ...]) -> Tensor:
        """Codes of the flattened rows under the input's leading dims: [*lead, *codes_per_token, ...].
        A [n, ...] input keeps the coder's own layout ([n * n_layers, ...] for MLSAE, token-major)."""
        if len(lead) == 1:
            return t
        return t.reshape(*lead, *self._codes_per_token(), *t.shape[1:])

    # --- the architecture's part -----------------------------------------------------------------
    @abc.abstractmethod
    def coder_input(self, x: Tensor) -> Tensor:
        """Model space -> [n, d] float32: exactly what the coder encodes (normalized space)."""

    def training_loss(
        self, x: Tensor, compute_dtype: torch.dtype, dead: Tensor | None = None, auxk_coef: float = 0.0,
        sparsity_coef: float = 0.0,
    ) -> TrainOutput:
        """Training forward on a batch in model space (any float dtype; bf16 from the store): the
        coder's training forward on `coder_input(x)`, which is also its target.
        sparsity_coef: the coder's sparsity coefficient now (coders without a fixed k)."""
        inp = self.coder_input(x)
        out = self.coder.forward_train(inp, compute_dtype, dead, self.config.d_model // 2, sparsity_coef)
        return self._train_output(out, inp, dead, auxk_coef, {})

    @abc.abstractmethod
    def reconstruct(self, x: Tensor) -> Any:
        """Model space in, reconstruction in model space out, both under the input's leading dims
        (implementations flatten with `_flatten` and restore with `_unflatten`)."""

    # --- the public API --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Model space in (float [..., d_model], or [..., n_layers, d_model] for multi-layer SAEs; the
        SAE normalizes it itself) -> dense latent activations [..., n_latents], float32.
        MLSAE makes a code per layer: [n * n_layers, n_latents] (token-major) for a [n, n_layers, d]
        input, [*lead, n_layers, n_latents] for other leading dims."""
        flat, lead = self._flatten(x)
        return self._codes_out(self.coder.encode(self.coder_input(flat)), lead)

    @torch.no_grad()
    def encode_sparse(self, x: Tensor) -> Latents:
        """As `encode`, but only the k kept latents per code: Latents(values [..., k], indices [..., k])."""
        flat, lead = self._flatten(x)
        lat = self.coder.encode_sparse(self.coder_input(flat))
        return Latents(self._codes_out(lat.values, lead), self._codes_out(lat.indices, lead))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Dense latents [..., n_latents] -> reconstruction [..., d_model] in the normalized space
        (the coder's input space: for RouteSAE hard routing, an estimate of p * x_norm; a
        crosscoder's is all its layers side by side, [..., n_layers * d_model])."""
        z = z.to(self.device)
        out = self.coder.decode(z.reshape(-1, z.shape[-1]))
        return out.reshape(*z.shape[:-1], out.shape[-1])

    @torch.no_grad()
    def decode_sparse(self, latents: Latents) -> Tensor:
        """As `decode`, from Latents (values [..., k], indices [..., k])."""
        values, indices = latents.values.to(self.device), latents.indices.to(self.device)
        k = values.shape[-1]
        out = self.coder.decode_sparse(Latents(values.reshape(-1, k), indices.reshape(-1, k)))
        return out.reshape(*values.shape[:-1], out.shape[-1])

    # --- saving ----------------------------------------------------------------------------------
    def export_tensors(self) -> dict[str, Tensor]:
        """Weights under SAELens names (the coder's: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, ...)."""
        return self.coder.export_tensors()

    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of export_tensors."""
        self.coder.load_exported(tensors)
