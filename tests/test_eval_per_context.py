"""eval's sums per held-out context (evaluate.per_context): they re-form every figure of the report,
one context's sums equal a direct computation on its tokens alone (the SAE run on them, the LLM run
with hooks), and per_context.npz reads back with plain numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from routesae.errors import RouteSAEError
from routesae.evaluate.per_context import (CACHE_METRICS, SPLICE_METRICS, PerContext, figures, ratio,
                                           read_per_context, write_per_context)
from routesae.evaluate.run import EvalConfig, run_eval
from routesae.model.loading import decoder_layers
from routesae.sae_folders import load_saes
from routesae.store.zarr_store import Cache
from routesae.train.config import FitConfig
from routesae.train.trainer import fit
from tiny_models import tiny_store_with_saes

CACHE_FIGURES = ("l0", "normmse", "fvu")
SPLICE_FIGURES = ("kl_per_token", "kl_per_context", "ce_clean", "ce_spliced", "ce_zero", "delta_ce", "loss_recovered")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny Llama, its store (contexts of 32), TopK, RouteSAE, MLSAE and a soft RouteSAE, and
    their eval with --splice; cache batches of 200 tokens, across context boundaries."""
    root = tmp_path_factory.mktemp("percontext")
    model_dir = tiny_store_with_saes(root, ["topk", "routesae", "mlsae"], tokens=2048)
    fit(FitConfig(cache=str(root / "s.zarr"), out=str(root / "soft"), archs=["routesae"], ks=[8], latents=64,
                  batch_size=256, eval_tokens=0.25, routed_layers=[1, 2, 3], routing="soft", progress=False,
                  tokens=2048))
    saes = [str(root / "runs" / n) for n in ("topk-k8", "routesae-k8", "mlsae-k8")] + [str(root / "soft")]
    report = run_eval(EvalConfig(saes=saes, cache=str(root / "s.zarr"), splice=True, batch_tokens=200,
                                 progress=False))
    return root, model_dir, report


def test_the_sums_re_form_every_figure_of_the_report(evaluated):
    _, _, report = evaluated
    pc = report.per_context
    ctx = report.context_len
    a, b = report.token_range
    np.testing.assert_array_equal(pc.contexts, np.arange(a // ctx, b // ctx))
    assert pc.context_len == ctx
    own = [r for r in report.rows if r.routing != "mean"]
    assert pc.names == [r.name for r in own]
    assert set(pc.metrics) == set(CACHE_METRICS) | set(SPLICE_METRICS)
    for m in pc.metrics.values():
        assert m.shape == (len(own), b // ctx - a // ctx) and m.dtype == np.float64
    got = figures(pc)
    spliced = 0
    for i, row in enumerate(own):
        assert pc.metrics["n_tokens"][i].sum() == row.cache.n_tokens == report.n_tokens
        want = row.flat()
        for key in CACHE_FIGURES:
            if math.isnan(want[key]):  # FVU of soft routing: no pieces either
                assert key == "fvu" and row.path.endswith("soft")
                assert np.isnan(pc.metrics["sse"][i]).all() and np.isnan(pc.metrics["sst"][i]).all()
                continue
            assert got[key][i] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (row.name, key)
        if row.splice is None:  # soft routing (its [random-layer] is one layer a token): no splice, NaN sums
            assert all(np.isnan(pc.metrics[m][i]).all() for m in SPLICE_METRICS)
            continue
        spliced += 1
        assert pc.metrics["n_kl"][i].sum() == row.splice.n_positions
        assert pc.metrics["n_ce"][i].sum() == row.splice.n_ce_positions
        for key in SPLICE_FIGURES:
            assert got[key][i] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (row.name, key)
        assert want["kl_per_token"] > 0
    assert spliced == len(own) - 2  # all but the soft RouteSAE's own and uniform routings
    # the MLSAE's mean row: the mean over its per-layer rows of their re-formed figures
    layers = [i for i, n in enumerate(pc.layer_of) if n == "mlsae-k8"]
    assert len(layers) == 3 and pc.layer_of[0] == ""
    mean_row = next(r for r in report.rows if r.routing == "mean").flat()
    for key in CACHE_FIGURES + SPLICE_FIGURES:
        assert got[key][layers].mean() == pytest.approx(mean_row[key], rel=1e-9), key


def _store_context(cache: Cache, c: int):
    a, b = c * cache.context_len, (c + 1) * cache.context_len
    return a, b, cache.token_ids(a, b), cache.special(a, b)


def test_one_contexts_sums_equal_a_direct_computation(evaluated):
    root, model_dir, report = evaluated
    pc = report.per_context
    cache = Cache.open(root / "s.zarr")
    topk = load_saes([str(root / "runs" / "topk-k8")], torch.device("cpu"))[0].sae
    i = pc.names.index("topk-k8")
    layer = topk.config.layers[0]

    # FVU's pieces are centred on the means over all evaluated tokens: those first, in float64
    a, b = report.token_range
    keep_all = ~cache.special(a, b)
    x_all = cache.acts(layer, a, b)[keep_all].float()
    r_all = (x_all - topk.reconstruct(x_all)).double()
    mean_x, mean_r = x_all.double().mean(0), r_all.mean(0)

    j = 6  # tokens 192..224 of the evaluated range: split between two cache batches of 200 tokens
    c = int(pc.contexts[j])
    first, last = c * cache.context_len - a, (c + 1) * cache.context_len - 1 - a
    assert first // 200 != last // 200
    s, e, ids, special = _store_context(cache, c)
    keep = ~special
    x = cache.acts(layer, s, e)[keep].float()
    x_hat = topk.reconstruct(x)
    z = topk.encode(x)
    m = {name: pc.metrics[name][i, j] for name in pc.metrics}
    assert m["n_tokens"] == int(keep.sum()) == 31  # all but the BOS
    assert m["l0_sum"] == int((z > 0).sum())
    # (x_hat is float32: a batch of another size rounds it differently)
    assert m["sse"] == pytest.approx(float(((x - x_hat).double() - mean_r).pow(2).sum()), rel=1e-6)
    assert m["sst"] == pytest.approx(float((x.double() - mean_x).pow(2).sum()), rel=1e-9)

    # the splice: the context alone through the LLM, layer 3's non-special positions replaced by
    # the reconstruction (or zeros) with a forward hook; KL and CE in float64
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cache.model.get("compute_dtype") or cache.model["dtype"])  # the harvest's forward, as eval
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).eval()
    block = decoder_layers(model)[layer - 1]

    def logits(fn):
        def hook(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output).clone()
            h[0, keep] = fn(h[0, keep]).to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = block.register_forward_hook(hook) if fn is not None else None
        try:
            with torch.no_grad():
                return torch.log_softmax(model(ids[None].long()).logits[0].double(), -1)
        finally:
            if handle is not None:
                handle.remove()

    clean, spliced, zero = logits(None), logits(lambda h: topk.reconstruct(h.float())), logits(torch.zeros_like)
    kl = (clean.exp() * (clean - spliced)).sum(-1)[keep].sum()
    has_next = keep.clone()
    has_next[-1] = False
    tgt = torch.roll(ids.long(), -1)

    def ce(lp):
        return float(-lp.gather(-1, tgt[:, None])[:, 0][has_next].sum())

    assert m["n_kl"] == int(keep.sum()) and m["n_ce"] == int(has_next.sum())
    assert m["kl_sum"] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert m["ce_clean_sum"] == pytest.approx(ce(clean), rel=1e-6)
    assert m["ce_spliced_sum"] == pytest.approx(ce(spliced), rel=1e-6)
    assert m["ce_zero_sum"] == pytest.approx(ce(zero), rel=1e-6)
    assert m["ce_spliced_sum"] != m["ce_clean_sum"]


def test_the_sums_do_not_depend_on_how_the_contexts_are_batched(evaluated):
    # cache batches of 4,096 tokens (every context whole in one) instead of 200, splice batches of 4
    # contexts instead of 8: the same sums per context
    root, _, report = evaluated
    other = run_eval(EvalConfig(saes=[str(root / "runs" / "topk-k8"), str(root / "runs" / "routesae-k8")],
                                cache=str(root / "s.zarr"), splice=True, batch_size=4, baselines=["random-layer"],
                                progress=False)).per_context
    pc = report.per_context
    assert other.names == ["topk-k8", "routesae-k8", "routesae-k8 [random-layer]"]
    np.testing.assert_array_equal(other.contexts, pc.contexts)
    rows = [pc.names.index(n) for n in other.names]
    for name in ("n_tokens", "l0_sum", "n_kl", "n_ce"):
        np.testing.assert_array_equal(other.metrics[name], pc.metrics[name][rows], err_msg=name)
    for name in ("normmse_sum", "sse", "sst"):
        np.testing.assert_allclose(other.metrics[name], pc.metrics[name][rows], rtol=1e-9, err_msg=name)
    for name in ("kl_sum", "ce_clean_sum", "ce_spliced_sum", "ce_zero_sum"):  # a forward of 4 contexts, not 8
        np.testing.assert_allclose(other.metrics[name], pc.metrics[name][rows], rtol=1e-4, atol=1e-6, err_msg=name)


def test_per_context_npz_reads_back_with_plain_numpy(evaluated, tmp_path):
    _, _, report = evaluated
    pc = report.per_context
    path = write_per_context(tmp_path / "out" / "per_context.npz", pc)
    assert path == tmp_path / "out" / "per_context.npz" and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    with np.load(path, allow_pickle=False) as z:
        assert str(z["format"]) == "routesae-per-context" and int(z["version"]) == 1
        assert z["names"].dtype.kind == "U" and z["names"].tolist() == pc.names
        assert z["layer_of"].tolist() == pc.layer_of
        np.testing.assert_array_equal(z["contexts"], pc.contexts)
        assert int(z["context_len"]) == pc.context_len
        assert sorted(z["metrics"].tolist()) == sorted(pc.metrics)
        for name, a in pc.metrics.items():
            np.testing.assert_array_equal(z[name], a)
        # the FVU of one row on a bootstrap resample of contexts, from the plain arrays
        row, sample = pc.names.index("topk-k8"), np.array([0, 0, 3, 7, 7, 7])
        fvu = z["sse"][row, sample].sum() / z["sst"][row, sample].sum()
    back = read_per_context(path)
    assert back.names == pc.names and back.layer_of == pc.layer_of and back.context_len == pc.context_len
    np.testing.assert_array_equal(back.contexts, pc.contexts)
    for name, a in pc.metrics.items():
        np.testing.assert_array_equal(back.metrics[name], a)
    assert ratio(back, "sse", "sst", rows=["topk-k8"], contexts=sample)[0] == pytest.approx(fvu, rel=1e-12)
    assert figures(back, contexts=sample)["fvu"][row] == pytest.approx(fvu, rel=1e-12)
    assert figures(back, contexts=sample)["fvu"][row] != pytest.approx(figures(back)["fvu"][row], rel=1e-6)


def test_figures_of_a_resample_and_bad_files():
    # two rows, three contexts: ratios of the sums over the chosen columns, repeats counted twice
    pc = PerContext(["a", "b"], np.array([10, 11, 12]), {
        "n_tokens": np.array([[2.0, 4.0, 0.0], [2.0, 4.0, 0.0]]),
        "l0_sum": np.array([[6.0, 4.0, 0.0], [2.0, 2.0, 0.0]]),
        "normmse_sum": np.zeros((2, 3)), "sse": np.ones((2, 3)), "sst": np.full((2, 3), 2.0),
        "n_kl": np.array([[2.0, 4.0, 0.0]] * 2), "kl_sum": np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]]),
        "n_ce": np.array([[1.0, 3.0, 0.0]] * 2),
        "ce_clean_sum": np.array([[1.0, 3.0, 0.0]] * 2), "ce_spliced_sum": np.array([[2.0, 3.0, 0.0]] * 2),
        "ce_zero_sum": np.array([[5.0, 9.0, 0.0]] * 2)}, 32, ["", ""])
    f = figures(pc, contexts=[0, 0, 1])
    np.testing.assert_allclose(f["l0"], [16 / 8, 6 / 8])
    np.testing.assert_allclose(f["kl_per_token"], [5 / 8, 0.0])
    np.testing.assert_allclose(f["kl_per_context"], [5 / 3, 0.0])
    np.testing.assert_allclose(f["loss_recovered"], [(19 - 7) / (19 - 5)] * 2)
    assert np.isnan(figures(pc, contexts=[2])["l0"]).all()  # no token: no L0
    with pytest.raises(RouteSAEError, match="no row 'c'"):
        ratio(pc, "l0_sum", "n_tokens", rows=["c"])


def test_a_file_that_is_not_per_context_is_refused(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(RouteSAEError, match="not a routesae per-context file"):
        read_per_context(tmp_path / "other.npz")
    with pytest.raises(RouteSAEError, match="no per-context file"):
        read_per_context(tmp_path / "missing.npz")
