"""The splice engine on tiny random-weight Llama and GPT-2 models, checked against an independent
path: a plain `model(input_ids)` whose decoder blocks are hooked to replace their outputs, and
KL / CE computed in float64 numpy from its logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routesae.errors import RouteSAEError
from routesae.evaluate.splice import SpliceEvaluator, SpliceModel, SplicePlan, same_args
from routesae.model.loading import decoder_layers
from tiny_models import tiny_model

B, T = 3, 24


class FnSplicer:
    """Replaces, at each layer, the positions `layer_of` assigns to it by fn(x)."""

    def __init__(self, name, layers, fn, layer_of=None):
        self.name = name
        self.layers = layers
        self.fn = fn
        self.layer_of = layer_of  # [B, T] -> hidden-state index per position (None: all at layers[0])
        self.seen: list[tuple[int, torch.Tensor]] = []

    def clean_layers(self):
        return self.layers

    def plan(self, clean, keep, token_ids):
        if self.layer_of is None:
            return SplicePlan({self.layers[0]: keep}, self._replace)
        return SplicePlan({layer: keep & (self.layer_of == layer) for layer in self.layers}, self._replace)

    def _replace(self, layer, x, idx):
        self.seen.append((layer, idx.clone()))
        return self.fn(x)


def _model(kind, dtype=torch.float32):
    return tiny_model(kind).to(dtype).requires_grad_(False)


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (B, T), generator=g)
    ids[:, 0] = 1  # BOS
    ids[1, 10] = 2  # an EOS inside a context
    keep = (ids != 1) & (ids != 2)
    return ids, keep


def _hooked_logits(model, ids, assignments, fn):
    """Independent splice: a plain forward with forward hooks replacing block outputs.

    assignments: hidden-state index -> [B, T] bool positions to replace there."""
    blocks = decoder_layers(model)
    handles = []

    def make(mask):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[mask] = fn(h[mask]).to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    for layer, mask in assignments.items():
        handles.append(blocks[layer - 1].register_forward_hook(make(mask)))
    try:
        with torch.no_grad():
            return model(ids).logits.double()
    finally:
        for h in handles:
            h.remove()


def _np_metrics(clean_logits, spliced_logits, zero_logits, ids, keep):
    def logp(x):
        x = x.numpy()
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lc, ls, lz = logp(clean_logits), logp(spliced_logits), logp(zero_logits)
    kl = (np.exp(lc) * (lc - ls)).sum(-1)  # [B, T]
    k = keep.numpy()
    has_next = k.copy()
    has_next[:, -1] = False
    tgt = np.roll(ids.numpy(), -1, axis=1)
    pick = lambda lp: -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]  # noqa: E731
    ce = lambda lp: pick(lp)[has_next].mean()  # noqa: E731
    per_ctx = (kl * k).sum(1).mean()
    return kl[k].mean(), per_ctx, ce(lc), ce(ls), ce(lz)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clean_run_equals_the_plain_forward(kind, dtype):
    model = _model(kind, dtype)
    ids, _ = _ids()
    sm = SpliceModel(model)
    clean = sm.clean(ids, {1, 2}, 1)
    got = sm.logits(clean.final.reshape(B * T, -1)).view(B, T, -1)
    with torch.no_grad():
        want = model(ids).logits.float()
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_identity_splice_gives_kl_0_delta_ce_0_loss_recovered_1_and_zero_gives_0(kind):
    model = _model(kind, torch.bfloat16)
    ids, keep = _ids()
    ident = FnSplicer("identity", [2], lambda x: x)
    zero = FnSplicer("zero", [2], torch.zeros_like)
    ev = SpliceEvaluator(model, [ident, zero], chunk_positions=16)
    ev.add_batch(ids, keep)
    r_id, r_zero = ev.results()
    assert r_id.kl_per_token == 0.0 and r_id.kl_per_context == 0.0
    assert r_id.delta_ce == 0.0
    assert r_id.loss_recovered == 1.0
    assert r_zero.loss_recovered == pytest.approx(0.0, abs=1e-5)  # CE(spliced) = CE(zero) up to float32 rounding
    assert r_zero.kl_per_token > 0 and r_zero.delta_ce > 0
    assert r_id.n_positions == int(keep.sum())
    assert r_id.replaced_per_layer == {2: int(keep.sum())}
    # the replacement only ever saw non-special positions
    assert all(bool(keep.reshape(-1)[idx].all()) for _, idx in ident.seen)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_splice_metrics_equal_an_independent_hooked_forward(kind):
    model = _model(kind)
    ids, keep = _ids(1)
    g = torch.Generator().manual_seed(3)
    layer_of = torch.randint(1, 4, (B, T), generator=g)
    affine = lambda x: 0.6 * x + 0.05  # noqa: E731
    single = FnSplicer("single", [2], affine)
    multi = FnSplicer("multi", [1, 2, 3], affine, layer_of)
    ev = SpliceEvaluator(model, [single, multi], chunk_positions=20, sub_positions=7, group=1)
    ev.add_batch(ids, keep)
    r_single, r_multi = ev.results()
    clean = _hooked_logits(model, ids, {}, affine)
    for r, assign in (
        (r_single, {2: keep}),
        (r_multi, {layer: keep & (layer_of == layer) for layer in (1, 2, 3)}),
    ):
        spliced = _hooked_logits(model, ids, assign, affine)
        zero = _hooked_logits(model, ids, assign, torch.zeros_like)
        kl, per_ctx, ce_c, ce_s, ce_z = _np_metrics(clean, spliced, zero, ids, keep)
        assert r.kl_per_token == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert r.kl_per_context == pytest.approx(per_ctx, rel=1e-4, abs=1e-6)
        assert r.ce_clean == pytest.approx(ce_c, rel=1e-5)
        assert r.ce_spliced == pytest.approx(ce_s, rel=1e-5)
        assert r.ce_zero == pytest.approx(ce_z, rel=1e-5)
        assert r.loss_recovered == pytest.approx((ce_z - ce_s) / (ce_z - ce_c), rel=1e-4)
        assert kl > 1e-4  # the splice did change something


def test_prefix_is_computed_once_and_zero_ablations_are_shared():
    model = _model("llama")
    ids, keep = _ids()
    blocks = decoder_layers(model)
    calls = [0] * len(blocks)
    # hooked on each block's MLP: the pass-through forward that only collects the blocks' arguments
    # calls the blocks (and their hooks) but runs nothing inside them
    handles = [b.mlp.register_forward_pre_hook(lambda m, a, j=j: calls.__setitem__(j, calls[j] + 1))
               for j, b in enumerate(blocks)]
    try:
        a = FnSplicer("a", [3], lambda x: 0.5 * x)
        b = FnSplicer("b", [3], lambda x: 0.9 * x)  # same layer and positions: one shared zero run
        ev = SpliceEvaluator(model, [a, b])
        ev.add_batch(ids, keep)
    finally:
        for h in handles:
            h.remove()
    # blocks 0..2 run only in the clean forward; block 3 in clean + 2 splices + 1 zero-ablation
    assert calls == [1, 1, 1, 4]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_zero_ablation_runs_each_distinct_context_once_and_gives_the_same_numbers(kind):
    model = _model(kind, torch.bfloat16)
    g = torch.Generator().manual_seed(11)

    def batch():
        ids = torch.randint(3, 500, (4, T), generator=g)
        ids[:, 0] = 1  # BOS everywhere; context 1 also has an EOS, whose activation depends on its text
        ids[1, 10] = 2
        return ids, (ids != 1) & (ids != 2)

    batches = [batch() for _ in range(2)]
    blocks = decoder_layers(model)
    sizes: list[int] = []  # batch size of every call of block 3's MLP
    mlp = blocks[3].mlp
    handle = mlp.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))

    def evaluate(share):
        single = FnSplicer("single", [2], lambda x: 0.6 * x + 0.05)
        multi = FnSplicer("multi", [1, 2, 3], lambda x: 0.6 * x + 0.05,
                          torch.randint(1, 4, (4, T), generator=torch.Generator().manual_seed(5)))
        ev = SpliceEvaluator(model, [single, multi], share_zero_runs=share)
        sizes.clear()
        for ids, keep in batches:
            ev.add_batch(ids, keep)
        return ev, list(sizes)

    try:
        shared, shared_sizes = evaluate(True)
        whole, whole_sizes = evaluate(False)
    finally:
        handle.remove()
    # zeroing layer 2 leaves contexts 0, 2 and 3 alike (a BOS and zeros): batch one runs 2 of its 4
    # contexts; batch two finds that one kept and runs only its context 1; the multi-layer plan's
    # contexts all differ
    assert shared.zero_contexts == {"run": 2 + 1 + 4 + 4, "shared": 2 + 3 + 0 + 0}
    assert whole.zero_contexts == {"run": 16, "shared": 0}
    # block 3 per batch: the clean run, two splices, the two zero-ablations (the first one shared)
    assert shared_sizes == [4, 4, 4, 2, 4] + [4, 4, 4, 1, 4]
    assert whole_sizes == [4] * 10
    # on a CPU a context's rows come out the same whatever else is in its batch: the same numbers
    assert shared.results() == whole.results()


def test_plans_on_special_positions_and_the_last_hidden_state_are_refused():
    model = _model("llama")
    ids, keep = _ids()
    everything = FnSplicer("bad", [2], lambda x: x)
    everything.plan = lambda clean, k, t: SplicePlan({2: torch.ones_like(k)}, lambda layer, x, i: x)
    with pytest.raises(RouteSAEError, match="special"):
        SpliceEvaluator(model, [everything]).add_batch(ids, keep)
    with pytest.raises(RouteSAEError, match="final norm"):
        SpliceEvaluator(model, [FnSplicer("last", [4], lambda x: x)])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("store", ["equal", "perturbed", "probe-differs"])
def test_clean_runs_start_from_the_store_only_when_it_equals_the_live_forward(kind, store, monkeypatch):
    model = _model(kind, torch.bfloat16)
    batches = [_ids(seed) for seed in (4, 5, 6)]
    g = torch.Generator().manual_seed(7)
    layer_of = torch.randint(1, 4, (B, T), generator=g)

    def splicers():
        return [FnSplicer("single", [2], lambda x: 0.6 * x + 0.05),
                FnSplicer("multi", [1, 2, 3], lambda x: 0.6 * x + 0.05, layer_of)]

    def stored_of(ids):
        def fn(layers):
            hs = _hidden_states(model, ids)
            return {layer: hs[layer] + (1.0 if store == "perturbed" else 0.0) for layer in layers}
        return fn

    live = SpliceEvaluator(model, splicers(), prefix="live")
    auto = SpliceEvaluator(model, splicers(), prefix="auto")
    if store == "probe-differs":  # as where kernels round differently for one context than for a batch
        monkeypatch.setattr(auto, "_probe", lambda ids, stored: False)
    blocks = decoder_layers(model)
    calls = [0] * len(blocks)
    reads = 0
    for ids, keep in batches:
        live.add_batch(ids, keep)
        stored = stored_of(ids)(auto.record)  # the stand-in store runs the model: before the counting
        handles = [b.mlp.register_forward_pre_hook(lambda m, a, j=j: calls.__setitem__(j, calls[j] + 1))
                   for j, b in enumerate(blocks)]

        def read(layers, stored=stored):
            nonlocal reads
            reads += 1
            return {layer: stored[layer] for layer in layers}

        try:
            auto.add_batch(ids, keep, stored=read)
        finally:
            for h in handles:
                h.remove()
    if store == "equal":
        # the probe runs blocks 0..2 once; then per batch the clean run only block 3 (the store holds
        # layers 1..3), each splice and zero-ablation the blocks from its first layer (2, or 1)
        assert calls == [1, 1 + 3 * 2, 1 + 3 * 4, 3 * 5]
    assert live.batches == {"live": 3, "store": 0} and live.probes == 0
    if store == "perturbed":  # the probe differs, and so does the first whole batch: never read again
        assert auto.batches == {"live": 3, "store": 0} and auto.store_matches is False and auto.store_diff > 0
        assert auto.probes == 1 and reads == 1
    elif store == "probe-differs":  # the first batch runs live and shows the store equal
        assert auto.batches == {"live": 1, "store": 2} and auto.store_matches and reads == 3
    else:  # one context shows the store equal: every batch, the first included, starts from it
        assert auto.batches == {"live": 0, "store": 3} and auto.store_matches and auto.probes == 1
    # either way the metrics are those of the live forward, bit for bit
    assert auto.results() == live.results()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pass_through_forward_gives_the_blocks_the_arguments_of_a_real_one(kind):
    model = _model(kind, torch.bfloat16)
    sm = SpliceModel(model)
    ids, _ = _ids(3)
    real = sm.clean(ids, {1}, args_from=1)
    forwards = [b.__dict__.get("forward") for b in sm.blocks]
    passed = sm.block_args(ids, args_from=1)
    assert [b.__dict__.get("forward") for b in sm.blocks] == forwards  # the blocks are put back
    assert all(same_args(passed[j], real.block_args[j]) for j in range(1, sm.n_layers))
    assert passed[0] == ((), {})  # before args_from: not kept
    # a batch of another shape gets other arguments where the model's depend on it, and runs the
    # blocks to the same result as its real forward
    two = ids[:2]
    args_two = sm.block_args(two, args_from=1)
    real_two = sm.clean(two, {1}, args_from=1)
    final, _ = sm.run_from(real_two.inputs[1], 1, args_two)
    assert torch.equal(final, real_two.final)
    # the comparison itself can fail
    assert not same_args(((torch.ones(2),), {"a": None}), ((torch.ones(2),), {"a": 1}))
    assert not same_args(((torch.ones(2),), {}), ((torch.ones(2, dtype=torch.bfloat16),), {}))
    assert same_args(((torch.ones(2), 3), {"a": (None, True)}), ((torch.ones(2), 3), {"a": (None, True)}))


def test_a_probe_stops_at_the_deepest_recorded_layer():
    model = _model("llama")
    sm = SpliceModel(model)
    ids, _ = _ids()
    calls = [0] * sm.n_layers
    handles = [b.register_forward_pre_hook(lambda m, a, j=j: calls.__setitem__(j, calls[j] + 1))
               for j, b in enumerate(sm.blocks)]
    try:
        run = sm.clean(ids, {1, 2}, args_from=1, stop=True)
    finally:
        for h in handles:
            h.remove()
    assert run.final is None and sorted(run.inputs) == [1, 2]
    # our pre-hooks run before the engine's, so block 2's fires before the forward stops there
    assert calls == [1, 1, 1, 0]
    torch.testing.assert_close(run.inputs[2], _hidden_states(model, ids)[2], rtol=0, atol=0)


def _hidden_states(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states
