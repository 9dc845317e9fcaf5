"""The splice engine: run an LLM on whole contexts, replace chosen activations, measure the output.

One clean forward per batch of contexts records the input of every decoder block (its hidden state
and the arguments the model passed it: masks, rotary embeddings, ...). Each variant (an SAE's
splice, its zero-ablation) then continues from the clean hidden state at its first modified layer,
calling the same blocks with the same arguments, so the prefix is computed once and shared, and an
unmodified continuation is bit-identical to the clean run. Once the store's activations are shown
equal to the live forward's bit for bit (see SpliceEvaluator), batches skip the prefix altogether:
the clean run continues from the deepest stored layer and each variant from the stored state at
its first layer (the harvest computed that prefix already). Identical zero-ablations (same layer, same positions, as for
several single-layer SAEs at one layer) run once, and so do identical contexts within one: zeroing
every non-special position at a layer erases the tokens, so all contexts with the same special
tokens (typically just a BOS at position 0) continue identically; each distinct one runs once, and
recurring ones are kept across batches.

The engine knows nothing of SAEs: a `Splicer` says which clean activations it needs and returns a
`SplicePlan` (which positions to replace at which layer, and a function giving the replacements).
Layers are Hugging Face `hidden_states` indices: splicing layer i replaces the input of block i,
which is the output of block i-1 (0 = the embeddings). The last index (after the final norm) cannot
be spliced: nothing of the model runs after it but the LM head.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from routesae.errors import RouteSAEError
from routesae.evaluate.metrics import kl_from_logits, logit_stats, loss_recovered
from routesae.evaluate.per_context import SPLICE_METRICS
from routesae.model.hooks import StopForward, block_hidden
from routesae.model.loading import decoder_layers, final_norm

# (layer, live activations [n, d] in the model's dtype, flat positions [n] into batch*seq) -> [n, d]
ReplaceFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


SUB_POSITIONS_CPU = 16
"""Positions per float32 metric pass on a CPU: [16, vocab] float32 work buffers stay in its cache."""
SUB_POSITIONS_GPU = 256
"""On a GPU: enough rows per pass to fill it (4 buffers of [256, 128k] float32 are 0.5 GB)."""


class SplicePlan(NamedTuple):
    """What one variant changes in one batch of contexts."""

    masks: dict[int, torch.Tensor]
    """hidden_states index -> [batch, seq] bool, the positions replaced at that layer."""
    replace: ReplaceFn
    """Gives the replacement activations for the masked positions of a layer."""


class Splicer(Protocol):
    """Anything that can be spliced: an SAE, a baseline, an identity stand-in."""

    name: str

    def clean_layers(self) -> list[int]:
        """Clean activations (hidden_states indices) that `plan` needs, e.g. all routed layers."""
        ...

    def plan(self, clean: dict[int, torch.Tensor], keep: torch.Tensor, token_ids: torch.Tensor) -> SplicePlan:
        """clean: layer -> [batch, seq, d] clean activations; keep: [batch, seq] bool, the non-special
        positions (the only ones that may be replaced); token_ids: [batch, seq] the positions' indices
        in the store (for choices that must be a function of the token, such as a random layer)."""
        ...


def zero_plan(plan: SplicePlan) -> SplicePlan:
    """The zero-ablation of a plan: the same positions at the same layers, set to 0."""
    return SplicePlan(plan.masks, lambda layer, x, idx: torch.zeros_like(x))


def plan_key(plan: SplicePlan) -> str:
    """Identifies a plan's masks, so identical zero-ablations (same layer, same positions) run once."""
    h = hashlib.sha1()
    for layer in sorted(plan.masks):
        m = plan.masks[layer]
        if bool(m.any()):
            h.update(str(layer).encode())
            h.update(m.to("cpu", torch.uint8).numpy().tobytes())
    return h.hexdigest()


def context_keys(h: torch.Tensor, masks: dict[int, torch.Tensor], after: int) -> list[str]:
    """Per context: a digest of its state h [batch, seq, d] and of the positions a plan replaces in
    it at layers after `after` (masks: layer -> [batch, seq]). Two contexts with one digest run the
    rest of a zero-ablation identically."""
    raw = h.detach().contiguous().view(torch.uint8).reshape(h.shape[0], -1).cpu().numpy()
    later = [(layer, m.to("cpu", torch.uint8).numpy()) for layer, m in sorted(masks.items()) if layer > after]
    head = f"{h.dtype} {tuple(h.shape[1:])} {after}".encode()
    keys = []
    for c in range(h.shape[0]):
        d = hashlib.sha1(head)
        d.update(raw[c].data)
        for layer, m in later:
            if m[c].any():
                d.update(str(layer).encode())
                d.update(m[c].data)
        keys.append(d.hexdigest())
    return keys


class ZeroRun(NamedTuple):
    """A zero-ablation of one batch, each distinct context computed once."""

    final: torch.Tensor
    """[n_distinct, seq, d] final-normed last hidden states of the distinct contexts."""
    context_of: torch.Tensor
    """[batch] long: the row of `final` each context of the batch equals."""


def first_layer(plan: SplicePlan) -> int | None:
    layers = [layer for layer, m in plan.masks.items() if bool(m.any())]
    return min(layers) if layers else None


BlockArgs = list[tuple[tuple, dict[str, Any]]]
"""Per block, the arguments after the hidden state and the keyword arguments the model passed."""


def _split_args(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    """A block call's arguments -> (hidden state, the other positional ones, the keyword ones)."""
    kw = dict(kwargs)
    if args:
        return args[0], tuple(args[1:]), kw
    return kw.pop("hidden_states"), (), kw


def same_args(a: Any, b: Any) -> bool:
    """Whether two recorded block arguments are the same: tensors equal in dtype, shape, device and
    every element; containers item by item; anything else by ==, and unequal when that fails."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_args(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_args(a[k], b[k]) for k in a)
    try:
        return a is b or (type(a) is type(b) and bool(a == b))
    except Exception:  # an object without a usable ==: cannot show it is the same
        return False


class CleanRun(NamedTuple):
    """What the clean forward of one batch leaves for the variants."""

    final: torch.Tensor | None
    """[batch, seq, d] last hidden state after the final norm (what the LM head reads); None for a
    forward stopped early."""
    inputs: dict[int, torch.Tensor]
    """hidden_states index -> [batch, seq, d], the clean input of that block."""
    block_args: BlockArgs
    """Per block (from the first one a variant may start at), what the model passed it."""


class SpliceModel:
    """Wraps a causal LM for clean runs, runs from a layer on, and the LM head."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.blocks = decoder_layers(model)
        self.n_layers = len(self.blocks)
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise RouteSAEError(f"{type(model).__name__} has no LM head to compute logits with")
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        # Gemma-2 style logit soft-capping is part of the model's output distribution.
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.vocab_size = self.head.weight.shape[0]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.tuple_outputs: bool | None = None
        """Whether the blocks return a tuple (GPT-2, older transformers) rather than a tensor; known
        once a block has run."""

    def check_layers(self, layers: list[int], who: str) -> None:
        for layer in layers:
            if layer == self.n_layers:
                raise RouteSAEError(
                    f"{who}: layer {layer} is the last hidden state, after the final norm; only the LM head "
                    f"follows it, so it cannot be spliced (spliceable: 0..{self.n_layers - 1})"
                )
            if not 0 <= layer < self.n_layers:
                raise RouteSAEError(f"{who}: layer {layer} is outside this model's 0..{self.n_layers - 1}")

    @torch.inference_mode()
    def clean(self, input_ids: torch.Tensor, record: set[int], args_from: int = 0, stop: bool = False) -> CleanRun:
        """Clean forward of the decoder; records block inputs at `record` and the arguments of
        blocks args_from.. (the ones later runs call again). stop: end the forward once the deepest
        input in `record` is taken (no final state then, and no arguments of the blocks after it)."""
        inputs: dict[int, torch.Tensor] = {}
        block_args: BlockArgs = [((), {})] * self.n_layers
        last = max(record) if record else None

        def make_hook(j: int):
            def hook(module, args, kwargs):
                h, rest, kw = _split_args(args, kwargs)
                if j in record:
                    inputs[j] = h
                if j >= args_from:
                    block_args[j] = (rest, kw)
                if stop and j == last:
                    raise StopForward

            return hook

        def note_output(module, args, output):
            self.tuple_outputs = isinstance(output, (tuple, list))

        handles = [self.blocks[0].register_forward_hook(note_output)]
        final = None
        try:
            for j, block in enumerate(self.blocks):
                if j in record or j >= args_from:
                    handles.append(block.register_forward_pre_hook(make_hook(j), with_kwargs=True))
            out = self.model.base_model(input_ids=input_ids, use_cache=False)
            final = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return CleanRun(final, inputs, block_args)

    @torch.inference_mode()
    def block_args(self, input_ids: torch.Tensor, args_from: int) -> BlockArgs:
        """The arguments the model passes blocks args_from.. for a batch of input_ids, without
        running any block: while the model's forward runs, each block is swapped for a pass-through
        that records them. The model computes them (masks, rotary embeddings, positions) from the
        batch before its first block, so they are a full forward's, which SpliceEvaluator checks
        against a real forward before relying on this. Needs a block to have run once (the output
        type)."""
        if self.tuple_outputs is None:
            raise RuntimeError("block_args needs a clean run first, to know what the blocks return")
        block_args: BlockArgs = [((), {})] * self.n_layers

        def pass_through(j: int):
            def forward(*args, **kwargs):
                h, rest, kw = _split_args(args, kwargs)
                if j >= args_from:
                    block_args[j] = (rest, kw)
                if j == self.n_layers - 1:
                    raise StopForward  # nothing after the blocks is needed
                return (h,) if self.tuple_outputs else h

            return forward

        # forward may already be an instance attribute (accelerate's hooks put one there): put back
        # exactly what was there
        saved = [block.__dict__.get("forward") for block in self.blocks]
        try:
            for j, block in enumerate(self.blocks):
                block.forward = pass_through(j)
            self.model.base_model(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass
        finally:
            for block, fwd in zip(self.blocks, saved):
                if fwd is None:
                    del block.forward
                else:
                    block.forward = fwd
        return block_args

    @torch.inference_mode()
    def run_from(
        self,
        h: torch.Tensor,
        start: int,
        block_args: BlockArgs,
        plan: SplicePlan | None = None,
        record: set[int] = frozenset(),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks start.. on h (the input of block `start`), applying the plan's replacements
        before each block; -> (final-normed last hidden state, block inputs at `record`)."""
        d = h.shape[-1]
        recorded: dict[int, torch.Tensor] = {}
        for j in range(start, self.n_layers):
            mask = plan.masks.get(j) if plan is not None else None
            if mask is not None and bool(mask.any()):
                idx = mask.reshape(-1).nonzero().squeeze(1)
                flat = h.reshape(-1, d).clone()  # never write into a tensor another run reads
                flat[idx] = plan.replace(j, flat[idx], idx).to(flat.dtype)
                h = flat.view_as(h)
            if j in record:
                recorded[j] = h
            rest, kw = block_args[j]
            h = block_hidden(self.blocks[j](h, *rest, **kw))
        return self.norm(h), recorded

    def continue_from(self, clean: CleanRun, plan: SplicePlan) -> torch.Tensor:
        """A variant: the clean run's state at the plan's first layer, then the blocks from there
        with the plan's replacements; -> final-normed last hidden state [batch, seq, d].
        A plan that replaces nothing returns the clean run's."""
        start = first_layer(plan)
        if start is None:
            return clean.final
        return self.run_from(clean.inputs[start], start, clean.block_args, plan)[0]

    @torch.inference_mode()
    def head_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """LM head on final-normed hidden states [n, d] -> logits [n, vocab] in the model's dtype,
        into `out` (a [>= n, vocab] buffer) where the head is a plain linear layer. A logits block
        is tens of MB: allocated afresh each time, its pages are faulted in (and zeroed by the
        kernel) each time, which measured ~8% of an eval's CPU time."""
        if out is None or type(self.head) is not torch.nn.Linear:
            return self.head(hidden)
        out = torch.matmul(hidden, self.head.weight.T, out=out[: hidden.shape[0]])
        return out if self.head.bias is None else out.add_(self.head.bias)

    def float_logits(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Model-dtype logits -> the float32 logits of the model's output distribution (into `out`)."""
        if out is not None:
            logits = out.copy_(logits)
        else:  # capped in place below: on a copy, never the caller's tensor (float() of float32 is itself)
            logits = logits.to(torch.float32, copy=bool(self.softcap))
        if self.softcap:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed hidden states [n, d] -> float32 logits [n, vocab]."""
        return self.float_logits(self.head_logits(hidden))


@dataclass
class SpliceTotals:
    """Running sums of one splicer's splice metrics (float64), over the metric positions."""

    kl_sum: float = 0.0
    n_kl: int = 0
    kl_context_sums: list[float] = field(default_factory=list)
    ce_clean_sum: float = 0.0
    ce_spliced_sum: float = 0.0
    ce_zero_sum: float = 0.0
    n_ce: int = 0
    replaced: dict[int, int] = field(default_factory=dict)
    """hidden_states index -> positions replaced there."""
    context_sums: list[np.ndarray] = field(default_factory=list)
    """Per batch, float64 [len(SPLICE_METRICS), batch]: the sums above per context, in the order of
    per_context.SPLICE_METRICS (KL's are also kl_context_sums)."""


class SpliceResult(NamedTuple):
    """Splice metrics of one splicer over the evaluated contexts."""

    kl_per_token: float
    """Mean KL(clean || spliced) in nats over non-special positions."""
    kl_per_context: float
    """KL summed over the non-special positions of a context, averaged over contexts (the RouteSAE
    paper's kind of figure)."""
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    delta_ce: float
    """CE(spliced) - CE(clean), nats."""
    loss_recovered: float
    """(CE(zero) - CE(spliced)) / (CE(zero) - CE(clean))."""
    n_positions: int
    """Positions KL is averaged over (non-special)."""
    n_ce_positions: int
    """Positions CE is averaged over (non-special, with a next token in the context)."""
    n_contexts: int
    replaced_per_layer: dict[int, int]


def finish(t: SpliceTotals) -> SpliceResult:
    nan = float("nan")
    kl = t.kl_sum / t.n_kl if t.n_kl else nan
    ctx = sum(t.kl_context_sums) / len(t.kl_context_sums) if t.kl_context_sums else nan
    ce_c = t.ce_clean_sum / t.n_ce if t.n_ce else nan
    ce_s = t.ce_spliced_sum / t.n_ce if t.n_ce else nan
    ce_z = t.ce_zero_sum / t.n_ce if t.n_ce else nan
    return SpliceResult(kl, ctx, ce_c, ce_s, ce_z, ce_s - ce_c, loss_recovered(ce_c, ce_s, ce_z),
                        t.n_kl, t.n_ce, len(t.kl_context_sums), dict(sorted(t.replaced.items())))


def metric_positions(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [batch, seq] -> (flat indices where KL is measured, flat indices where CE is measured).

    Both exclude special positions (their activations are never replaced); CE also drops each
    context's last position, whose next token lies outside the context."""
    kl_pos = keep.reshape(-1).nonzero().squeeze(1)
    has_next = keep.clone()
    has_next[:, -1] = False
    ce_pos = has_next.reshape(-1).nonzero().squeeze(1)
    return kl_pos, ce_pos


PREFIXES = ("auto", "live")
StoredFn = Callable[[list[int]], dict[int, torch.Tensor]]
ProgressFn = Callable[[float, str], None]
"""(share of the batch's work done, 0..1, what runs next) -> None: how add_batch reports its way
through a batch, so a bar moves within one (a batch of a large model takes minutes)."""


class SpliceEvaluator:
    """Runs splicers over batches of contexts and accumulates their metrics.

    prefix 'live': every batch's clean run is a full forward. 'auto': clean runs start from the
    store's activations (given by `stored`) at the first spliced layer instead of recomputing the
    blocks before it (the harvest already did), once the store is shown to equal this machine's
    forward bit for bit:
    - first, per context length, a probe: one context runs live up to the deepest recorded layer
      (an eighth of a batch's prefix at 8 contexts per batch) and is compared with the store; if
      equal, every batch starts from the store, the first included, with the blocks' other
      arguments (masks, rotary embeddings: functions of the batch's shape for packed contexts
      without padding) taken from a pass-through forward, itself checked against the probe's;
    - where the probe differs (a GPU's kernels may round differently with the batch's size), the
      first batch of each shape runs live and is compared whole, as the harvest's batches were.
    Clean and variants then share that same stored state, so an identity splice still gives
    exactly 0, and the metrics equal those of live runs bit for bit.

    Zero-ablations run each distinct context once (see `_zero_run`); share_zero_runs=False runs
    them on the whole batch like any variant (same numbers on a CPU, for checking and benchmarks)."""

    def __init__(self, model: torch.nn.Module, splicers: list[Splicer], chunk_positions: int = 512,
                 prefix: str = "auto", sub_positions: int | None = None, group: int = 4, zero_cache_size: int = 16,
                 share_zero_runs: bool = True):
        if prefix not in PREFIXES:
            raise RouteSAEError(f"prefix {prefix!r} not one of {PREFIXES}")
        self.sm = SpliceModel(model)
        self.splicers = splicers
        self.totals = [SpliceTotals() for _ in splicers]
        self.chunk = chunk_positions
        on_gpu = next(model.parameters()).device.type == "cuda"
        # positions per float32 metric pass: few on a CPU, to stay in its cache; on a GPU many, as
        # each pass is ~30 kernel launches and a few host reads whatever its size
        self.sub = sub_positions or (SUB_POSITIONS_GPU if on_gpu else SUB_POSITIONS_CPU)
        self.group = group
        self.prefix = prefix
        self.record = sorted({layer for s in splicers for layer in s.clean_layers()})
        self._args: dict[tuple[int, ...], BlockArgs] = {}
        """Per batch shape: the blocks' other arguments, for runs that start from the store."""
        self._probe_ok: dict[int, bool] = {}
        """Per context length: whether the probe context's stored activations equalled a live forward's."""
        self._store_ok: dict[tuple[int, ...], bool] = {}
        """Per batch shape, where the probe failed: whether a whole live batch equalled the store."""
        self.store_diff: float = 0.0
        """Largest |stored - live| seen where they differ."""
        self.batches = {"live": 0, "store": 0}
        self.probes = 0
        """Probe contexts run live (one per context length)."""
        self._pass_through_ok: bool | None = None
        """Whether the pass-through forward gave the blocks a real forward's arguments (checked once)."""
        self._zero_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        """Context digest -> final hidden state [seq, d] of its zero-ablation, most recent last."""
        self.zero_cache_size = zero_cache_size
        """Distinct zero-ablated contexts kept across batches (a BOS-only context recurs in every one)."""
        self.share_zero_runs = share_zero_runs
        """False: every zero-ablation runs the whole batch, as any variant does."""
        self.zero_contexts = {"run": 0, "shared": 0}
        """Contexts whose zero-ablation was computed / taken from an identical context's."""
        self.contexts: list[int] = []
        """Per context measured, in order: its first position's token index // its length (the
        store context index, when add_batch is given store indices)."""
        for s in splicers:
            self.sm.check_layers(s.clean_layers(), s.name)

    def _plans(self, acts: dict[int, torch.Tensor], keep: torch.Tensor, token_index: torch.Tensor) -> list[SplicePlan]:
        plans = []
        for s in self.splicers:
            plan = s.plan({layer: acts[layer] for layer in s.clean_layers()}, keep, token_index)
            for layer, m in plan.masks.items():
                if layer not in acts:
                    raise RouteSAEError(f"{s.name}: splices layer {layer} but did not ask for its clean activations")
                if bool((m & ~keep).any()):
                    raise RouteSAEError(f"{s.name}: a plan replaces special positions")
            self.sm.check_layers(list(plan.masks), s.name)
            plans.append(plan)
        return plans

    @property
    def store_matches(self) -> bool | None:
        """None: never compared; True: the store equalled the live forward (probe or whole batch)."""
        checks = [*self._probe_ok.values(), *self._store_ok.values()]
        return any(checks) if checks else None

    @property
    def store_check(self) -> str | None:
        """What showed the store equal to this machine's forward: 'probe' (one context run live),
        'batch' (a whole batch run live), or None (nothing did)."""
        if any(self._probe_ok.values()):
            return "probe"
        return "batch" if any(self._store_ok.values()) else None

    def _equals_store(self, stored: dict[int, torch.Tensor], live: dict[int, torch.Tensor]) -> bool:
        ok = True
        for layer in self.record:
            s, x = stored[layer], live[layer]
            if s.dtype != x.dtype or s.shape != x.shape:
                ok = False
                continue
            if not torch.equal(s, x):
                ok = False
                self.store_diff = max(self.store_diff, float((s.float() - x.float()).abs().max()))
        return ok

    def _probe(self, input_ids: torch.Tensor, stored: dict[int, torch.Tensor]) -> bool:
        """Runs the batch's first context live up to the deepest recorded layer; -> whether the
        store equals it and the pass-through forward gives the blocks the arguments it did."""
        one = input_ids[:1]
        run = self.sm.clean(one, set(self.record), self.record[0], stop=True)
        self.probes += 1
        if not self._equals_store({layer: t[:1] for layer, t in stored.items()}, run.inputs):
            return False
        return self._check_pass_through(one, run, max(self.record))

    def _check_pass_through(self, input_ids: torch.Tensor, run: CleanRun, last: int) -> bool:
        """Whether the pass-through forward gives blocks record[0]..last the arguments `run` (a real
        forward of input_ids) gave them; remembered for the zero-ablations' smaller batches."""
        try:
            passed = self.sm.block_args(input_ids, self.record[0])
        except Exception:  # a model whose forward trips on pass-through blocks: the live path still works
            self._pass_through_ok = False
            return False
        self._pass_through_ok = all(same_args(passed[j], run.block_args[j]) for j in range(self.record[0], last + 1))
        return self._pass_through_ok

    def _from_store(self, input_ids: torch.Tensor, stored: dict[int, torch.Tensor]) -> bool:
        """Whether this batch's clean run may start from the store (see the class); gets the
        blocks' arguments for its shape when it may."""
        shape = tuple(input_ids.shape)
        if self._store_ok.get(shape) and shape in self._args:
            return True
        seq = shape[1]
        if seq not in self._probe_ok:
            self._probe_ok[seq] = self._probe(input_ids, stored)
        if not self._probe_ok[seq]:
            return False
        if shape not in self._args:
            self._args[shape] = self.sm.block_args(input_ids, self.record[0])
        return True

    @torch.inference_mode()
    def add_batch(self, input_ids: torch.Tensor, keep: torch.Tensor, token_index: torch.Tensor | None = None,
                  stored: StoredFn | None = None, progress: ProgressFn | None = None) -> None:
        """input_ids, keep: [batch, seq] (keep: non-special); token_index: [batch, seq] store indices
        of the positions (default 0..batch*seq-1); stored: layers -> their stored activations
        [batch, seq, d] for these contexts (lets the clean run start from the store, see the class).
        Runs the clean, spliced and zero variants and adds their metrics; `progress` hears of each
        run and of each chunk of positions measured."""
        # Work units of a batch, for `progress`: the clean run, each variant's run, each zero-
        # ablation (at most one per variant), each chunk of positions measured.
        n_var = len(self.splicers)
        n_chunks = -(-int(keep.sum()) // self.chunk)
        units, done = 1 + 2 * n_var + n_chunks, [0]

        def tick(doing: str, n: int = 1) -> None:
            done[0] += n
            if progress is not None:
                progress(min(done[0] / units, 1.0), doing)

        if progress is not None:
            progress(0.0, "clean run")
        dev = self.sm.device
        input_ids = input_ids.to(dev)
        keep = keep.to(dev)
        if token_index is None:
            token_index = torch.arange(input_ids.numel()).view(input_ids.shape)
        shape = tuple(input_ids.shape)
        acts = None
        # not read again for a shape whose whole live batch differed from it (after a failed probe)
        if stored is not None and self.prefix == "auto" and self.record and self._store_ok.get(shape) is not False:
            acts = {layer: t.to(dev) for layer, t in stored(self.record).items()}
        if acts is not None and self._from_store(input_ids, acts):
            plans = self._plans(acts, keep, token_index)
            # the store holds every recorded layer, so the clean run only needs the blocks after
            # the deepest (a RouteSAE's variants start at its first routed layer, from the store too)
            deepest = self.record[-1]
            final, _ = self.sm.run_from(acts[deepest], deepest, self._args[shape])
            clean = CleanRun(final, acts, self._args[shape])
            self.batches["store"] += 1
        else:
            # The arguments are kept from the first spliceable block on: every variant starts there or later.
            clean = self.sm.clean(input_ids, set(self.record), self.record[0] if self.record else self.sm.n_layers)
            self._args[shape] = clean.block_args
            if self._pass_through_ok is None and self.record and self.share_zero_runs:  # only sharing needs it
                self._check_pass_through(input_ids, clean, self.sm.n_layers - 1)
            if acts is not None and shape not in self._store_ok:
                # kernels may round differently with the batch's size, so this equality is per
                # batch shape (and holds when eval batches line up with the harvest's)
                self._store_ok[shape] = self._equals_store(acts, clean.inputs)
            plans = self._plans(clean.inputs, keep, token_index)
            self.batches["live"] += 1

        spliced = []
        for i, p in enumerate(plans):
            tick(f"splicing {self.splicers[i].name}")
            spliced.append(self.sm.continue_from(clean, p))
        zero_runs: dict[str, ZeroRun] = {}
        zero_of: list[str] = []
        for i, p in enumerate(plans):
            tick(f"zero-ablation for {self.splicers[i].name}")
            key = plan_key(p)
            if key not in zero_runs:
                zero_runs[key] = self._zero_run(clean, zero_plan(p), input_ids)
            zero_of.append(key)
        tick("KL and CE")

        for t, p in zip(self.totals, plans):
            for layer, m in p.masks.items():
                t.replaced[layer] = t.replaced.get(layer, 0) + int(m.sum())
        self._measure(input_ids, keep, clean.final, spliced, zero_runs, zero_of,
                      lambda: tick("KL and CE"))
        self.contexts.extend((token_index[:, 0] // shape[1]).tolist())

    def _zero_run(self, clean: CleanRun, plan: SplicePlan, input_ids: torch.Tensor) -> ZeroRun:
        """A zero-ablation, each distinct context once: contexts whose state at the plan's first
        layer (after zeroing) and whose later zeroed positions are the same bytes continue the same,
        so one of them runs (in a smaller batch, with the pass-through forward's arguments for its
        shape) and recurring ones are kept from earlier batches. Where the pass-through forward is
        not known to be right, the whole batch runs as any variant does."""
        b = input_ids.shape[0]
        everyone = torch.arange(b, device=input_ids.device)
        start = first_layer(plan)
        if start is None:
            return ZeroRun(clean.final, everyone)
        if not (self.share_zero_runs and self._pass_through_ok):
            self.zero_contexts["run"] += b
            return ZeroRun(self.sm.continue_from(clean, plan), everyone)
        h0 = clean.inputs[start].masked_fill(plan.masks[start].unsqueeze(-1), 0)
        keys = context_keys(h0, plan.masks, start)
        distinct = list(dict.fromkeys(keys))
        first_of = {k: keys.index(k) for k in distinct}
        todo = [k for k in distinct if k not in self._zero_cache]
        if todo:
            rows = [first_of[k] for k in todo]
            sel = torch.tensor(rows, device=input_ids.device)
            shape = (len(rows), input_ids.shape[1])
            if shape not in self._args:
                self._args[shape] = self.sm.block_args(input_ids[sel], self.record[0])
            later = SplicePlan({layer: m[sel] for layer, m in plan.masks.items() if layer > start}, plan.replace)
            final, _ = self.sm.run_from(h0[sel], start, self._args[shape], later)
            for k, f in zip(todo, final):
                self._zero_cache[k] = f.clone()
        for k in distinct:
            self._zero_cache.move_to_end(k)
        finals = torch.stack([self._zero_cache[k] for k in distinct])
        while len(self._zero_cache) > self.zero_cache_size:
            self._zero_cache.popitem(last=False)
        self.zero_contexts["run"] += len(todo)
        self.zero_contexts["shared"] += b - len(todo)
        index = {k: i for i, k in enumerate(distinct)}
        return ZeroRun(finals, torch.tensor([index[k] for k in keys], device=input_ids.device))

    def _zero_ce(self, run: ZeroRun, ce_pos: torch.Tensor, targets: torch.Tensor, bufs) -> torch.Tensor:
        """Sums over each context's CE positions of a zero-ablation's cross-entropy (float64
        [batch]); the LM head and the log-softmax run once per distinct row (position of a distinct
        context)."""
        seq, d = run.final.shape[1], run.final.shape[2]
        head_out, buf_run, work = bufs
        rows = run.context_of[ce_pos // seq] * seq + ce_pos % seq
        distinct, which = torch.unique(rows, return_inverse=True)  # sorted
        order = torch.argsort(which)
        which, tgt, at = which[order], targets[ce_pos][order], ce_pos[order]
        flat = run.final.reshape(-1, d)
        # each CE position's value at its place in the batch, summed per context at the end
        per_pos = torch.zeros(run.context_of.shape[0] * seq, dtype=torch.float64, device=ce_pos.device)
        for lo in range(0, distinct.numel(), self.chunk):
            logits = self.sm.head_logits(flat[distinct[lo : lo + self.chunk]], out=head_out)
            for sl in range(0, logits.shape[0], self.sub):
                n = min(self.sub, logits.shape[0] - sl)
                z = self.sm.float_logits(logits[sl : sl + n], out=buf_run[:n])
                logp = torch.log_softmax(z, dim=-1, out=work[:n])
                # the CE positions whose row is one of these n: a contiguous run of the sorted ones
                a, b = torch.searchsorted(which, torch.tensor([lo + sl, lo + sl + n], device=which.device)).tolist()
                per_pos[at[a:b]] = -logp[which[a:b] - (lo + sl), tgt[a:b]].double()
        return per_pos.view(-1, seq).sum(1)

    def _measure(self, input_ids, keep, clean_final, spliced, zero_runs: dict[str, ZeroRun], zero_of,
                 chunk_done: Callable[[], None] = lambda: None) -> None:
        """KL and CE of every spliced run against the clean one, and the zero-ablations' CE, over
        the metric positions; chunk_done() after each chunk of them.

        Vocabulary-sized work dominates here (SmolLM2: 49,152 logits per position, three runs at
        least), so: the LM head runs on `chunk` positions at a time (large enough that reading its
        weight is amortized) into reused buffers, its model-dtype logits are kept, and the float32
        metrics run on `sub` positions at a time, small enough to stay in cache, each pass over the
        vocabulary fused as far as plain torch allows. Spliced runs are taken `group` at a time to
        bound memory; a zero-ablation only needs CE, once per distinct row (see `_zero_ce`)."""
        b, s = input_ids.shape
        d = clean_final.shape[-1]
        dev = keep.device
        kl_pos, ce_pos = metric_positions(keep)
        targets = torch.roll(input_ids, -1, dims=1).reshape(-1)  # position t predicts token t+1
        is_ce = torch.zeros(b * s, dtype=torch.bool, device=dev)
        is_ce[ce_pos] = True
        n_var = len(spliced)
        # every position's KL and CE at its place in the batch (0 where not measured), summed per
        # context at the end: sums whose additions come in a fixed order (index_add_'s, on a GPU, do not)
        kl_at = torch.zeros(n_var, b * s, dtype=torch.float64, device=dev)
        ce_at = torch.zeros(n_var, b * s, dtype=torch.float64, device=dev)
        ce_clean_at = torch.zeros(b * s, dtype=torch.float64, device=dev)
        # spliced runs that differ from clean; an empty plan's run *is* the clean one (same tensor)
        runs = [(i, h) for i, h in enumerate(spliced) if h is not clean_final]
        groups = [runs[g : g + self.group] for g in range(0, len(runs), self.group)] or [[]]
        flat = lambda h: h.reshape(-1, d)  # noqa: E731
        n_sub = min(self.sub, max(1, int(kl_pos.numel())))
        n_chunk = min(self.chunk, max(1, int(kl_pos.numel())))
        vocab = self.sm.vocab_size
        # float32 work buffers for one sub-chunk, reused throughout (allocation is a pass too), and
        # the model-dtype logits of a chunk for the clean run and a group of runs
        buf_clean, buf_probs, buf_run = (torch.empty(n_sub, vocab, device=dev) for _ in range(3))
        work = torch.empty(3, n_sub, vocab, device=dev)
        head_out = torch.empty(1 + min(self.group, len(runs)), n_chunk, vocab, dtype=self.sm.dtype, device=dev)
        # per-row results of a chunk (float32), stored once per chunk rather than per sub-chunk
        row_ce_clean = torch.empty(n_chunk, device=dev)
        row_kl, row_ce = (torch.empty(self.group, n_chunk, device=dev) for _ in range(2))
        for lo in range(0, kl_pos.numel(), self.chunk):
            pos = kl_pos[lo : lo + self.chunk]
            n_pos = pos.numel()
            ce_mask, tgt = is_ce[pos], targets[pos].unsqueeze(1)
            z_clean_all = self.sm.head_logits(flat(clean_final)[pos], out=head_out[0])
            for g, group in enumerate(groups):
                z_all = [self.sm.head_logits(flat(h)[pos], out=head_out[1 + r]) for r, (_, h) in enumerate(group)]
                for sl in range(0, n_pos, self.sub):
                    n = min(self.sub, n_pos - sl)
                    rows = slice(sl, sl + n)
                    t = tgt[rows]
                    z_clean = self.sm.float_logits(z_clean_all[rows], out=buf_clean[:n])
                    ref = logit_stats(z_clean, with_probs=True, out=buf_probs[:n])
                    if g == 0:
                        torch.sub(ref.lse, z_clean.gather(1, t).squeeze(1), out=row_ce_clean[rows])
                    for r, z_run in enumerate(z_all):
                        # without soft-capping the model-dtype logits are the distribution's own
                        # and kl_from_logits reads them directly (one pass fewer)
                        z = z_run[rows] if not self.sm.softcap else self.sm.float_logits(z_run[rows], out=buf_run[:n])
                        kl, lse = kl_from_logits(z_clean, ref, z, work=work[:, :n])
                        row_kl[r, rows] = kl
                        torch.sub(lse, z.gather(1, t).squeeze(1).float(), out=row_ce[r, rows])
                ce_at_pos = pos[ce_mask]
                for r, (i, _) in enumerate(group):
                    kl_at[i, pos] = row_kl[r, :n_pos].double()
                    ce_at[i, ce_at_pos] = row_ce[r, :n_pos][ce_mask].double()
                del z_all
            ce_clean_at[pos[ce_mask]] = row_ce_clean[:n_pos][ce_mask].double()
            chunk_done()
        ce_c = ce_clean_at.view(b, s).sum(1)
        kl_ctx = kl_at.view(n_var, b, s).sum(-1)
        ce_s = ce_at.view(n_var, b, s).sum(-1)
        for i, h in enumerate(spliced):
            if h is clean_final:
                ce_s[i] = ce_c
        ce_z = {key: ce_c if run.final is clean_final else self._zero_ce(run, ce_pos, targets, (head_out[0], buf_run, work[0]))
                for key, run in zero_runs.items()}
        n_kl_ctx = keep.sum(1).double()  # the positions of metric_positions, per context
        n_ce_ctx = keep[:, :-1].sum(1).double()
        # one copy to the CPU per batch: [variant, SPLICE_METRICS (in its order), context]
        sums = torch.stack([torch.stack([n_kl_ctx, kl_ctx[i], n_ce_ctx, ce_c, ce_s[i], ce_z[zero_of[i]]])
                            for i in range(n_var)]).cpu().numpy() if n_var else np.zeros((0, len(SPLICE_METRICS), b))
        for t, per in zip(self.totals, sums):
            t.context_sums.append(per)
            got = dict(zip(SPLICE_METRICS, per))
            t.kl_sum += float(got["kl_sum"].sum())
            t.n_kl += int(got["n_kl"].sum())
            t.kl_context_sums.extend(got["kl_sum"].tolist())
            t.ce_clean_sum += float(got["ce_clean_sum"].sum())
            t.ce_spliced_sum += float(got["ce_spliced_sum"].sum())
            t.ce_zero_sum += float(got["ce_zero_sum"].sum())
            t.n_ce += int(got["n_ce"].sum())

    def results(self) -> list[SpliceResult]:
        return [finish(t) for t in self.totals]

    def per_context(self) -> list[dict[str, np.ndarray]]:
        """Per splicer: SPLICE_METRICS name -> float64 [contexts measured], in the order of `contexts`."""
        out = []
        for t in self.totals:
            sums = np.concatenate(t.context_sums, axis=1) if t.context_sums else np.zeros((len(SPLICE_METRICS), 0))
            out.append(dict(zip(SPLICE_METRICS, sums)))
        return out
