"""Settings of one SAE (saved with it) and of one fit (the command's arguments)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

NORMALIZATIONS = ("token", "dataset", "none")
ROUTINGS = ("hard", "soft")
AGGREGATES = ("sum", "mean")


@dataclass
class SAEConfig:
    """Everything needed to rebuild a trained SAE and to know what it was trained on."""

    arch: str
    """Registered architecture name: 'topk', 'routesae', 'batchtopk', 'vanilla', 'gated', 'jumprelu'."""
    d_model: int
    """Width of the residual stream the SAE reads."""
    n_latents: int
    """Number of dictionary latents (d_sae)."""
    k: int
    """Latents kept per token by a TopK-like coder (its target L0, for the others)."""
    layers: list[int]
    """Hugging Face hidden_states indices the SAE reads: one for topk, the routed layers for routesae."""
    routing: str = "hard"
    """RouteSAE only: 'hard' (arg-max layer times its weight) or 'soft' (weighted mix of all layers)."""
    aggregate: str = "sum"
    """RouteSAE only: how the router pools the normalized routed layers, 'sum' or 'mean'."""
    normalization: str = "token"
    """'token' (zero mean, unit variance across d_model per token), 'dataset' (times sqrt(d_model) / mean norm) or 'none'."""
    prefixes: list[int] | None = None
    """Matryoshka only: the nested dictionary sizes below n_latents (default n/16, n/8, n/4, n/2)."""
    dataset_scale: list[float] | None = None
    """With normalization 'dataset': the factor per entry of `layers`, from the cache's statistics."""
    cache_fingerprint: str = ""
    """Fingerprint of the activation cache the SAE was trained on."""
    model: dict[str, Any] = field(default_factory=dict)
    """The cache's model provenance (id, revision, dtype, n_layers, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in names})


@dataclass
class FitConfig:
    """The arguments of `routesae fit`; every field that changes the result is part of a resume check."""

    cache: str
    """Path of the activation store (Zarr) written by `routesae harvest`."""
    out: str
    """Output folder; with several SAEs, each gets a subfolder named ARCH-kK."""
    archs: list[str] = field(default_factory=lambda: ["routesae"])
    """Architectures to train on the same batches."""
    ks: list[int] = field(default_factory=lambda: [64])
    """TopK k values; every architecture is trained with every k."""
    latents: int | None = None
    """Dictionary size; default expansion * d_model."""
    expansion: float = 8.0
    """Dictionary size as a multiple of d_model, when latents is not given."""
    layer: int | list[int] | None = None
    """Layer (hidden_states index) of single-layer SAEs, or several (one SAE per layer, named
    ARCH-kK-lL, all from one read of the store); default the store's 3/4-depth layer."""
    routed_layers: list[int] | None = None
    """Layers RouteSAE routes over; default L//4 .. 3L//4 of the model behind the store."""
    routing: str = "hard"
    """RouteSAE routing, 'hard' or 'soft'."""
    aggregate: str = "sum"
    """RouteSAE router input, 'sum' or 'mean' of the normalized routed layers."""
    normalization: str = "token"
    """'token', 'dataset' or 'none' (see SAEConfig.normalization)."""
    tokens: int | None = None
    """Training budget in tokens; default epochs passes over the training split."""
    epochs: float = 1.0
    """Training budget in passes over the training split, when tokens is not given."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    lr: float = 5e-4
    """Peak Adam learning rate."""
    warmup: float = 0.05
    """Fraction of the budget with linear warm-up from 0."""
    decay: float = 0.2
    """Final fraction of the budget with linear decay to 0."""
    seed: int = 0
    """Seeds the initial weights and the data order."""
    device: str = "auto"
    """'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: str = "auto"
    """Compute dtype of the encoder matmul: 'auto' (bf16 where the hardware has it), 'bfloat16' or 'float32'."""
    eval_tokens: float = 0.05
    """Held-out tail never trained on: a fraction of the store if below 1, else a token count."""
    buffer_tokens: int = 65_536
    """Tokens in one shuffle buffer; the loader holds at most two buffers in RAM."""
    loader: str = "auto"
    """Who prepares the next buffer (data.py): 'mapped', 'process', 'thread', or 'auto' (mapped when
    training on the CPU from a store that allows it, else process)."""
    include_special: bool = False
    """Train on BOS/EOS/pad positions too (left out by default)."""
    auxk: bool = False
    """Add the AuxK loss on dead latents (OpenAI, sparsify; the RouteSAE paper has none). Its k_aux =
    d_model/2 latents per token make a step several times dearer while latents are dead."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    sparsity_coef: float | None = None
    """Sparsity coefficient of the coders without a k (vanilla, gated, jumprelu), in NormMSE units
    (see coders/base.py); given, it is kept fixed; default each coder's own, steered toward L0 = k
    (vanilla, gated; JumpReLU's penalty aims at k itself)."""
    matryoshka_prefixes: list[int] | None = None
    """Matryoshka's nested dictionary sizes below the latent count (default n/16, n/8, n/4, n/2)."""
    target_l0: float | None = None
    """The L0 every SAE aims at, the same as ks = [target_l0] (kept to say how ks was chosen)."""
    sparsity_warmup: float = 0.05
    """Fraction of the budget over which the sparsity coefficient ramps up from 0."""
    dead_tokens: int | None = None
    """Tokens without firing after which a latent counts as dead; default 10M, or a quarter of the budget if less."""
    log_every: int = 20
    """Steps between lines of metrics.jsonl."""
    checkpoint_every: int = 500
    """Steps between checkpoints (one is also written at the end)."""
    checkpoint_minutes: float = 10.0
    """Minutes of training between checkpoints: one is written whenever this or checkpoint_every
    is reached first, so a fit of fewer steps than checkpoint_every still keeps its work."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace a fit of another store or other settings that OUT holds (the fit's own files only)."""

    # Fields that do not change the trained weights, so a resume may change them.
    RESUMABLE_CHANGES = ("cache", "device", "loader", "log_every", "checkpoint_every", "checkpoint_minutes", "progress",
                         "overwrite")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result_fields(self) -> dict[str, Any]:
        """The arguments that decide the result (what a resume must match)."""
        return {k: v for k, v in asdict(self).items() if k not in self.RESUMABLE_CHANGES}
