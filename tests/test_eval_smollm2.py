"""Eval on the real offline SmolLM2-135M-Instruct: exactness of the splice engine on the real model,
and a TopK and a RouteSAE fitted on the SmolLM2 store, evaluated end to end with --splice."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from routesae import Cache
from routesae.cli import main
from routesae.evaluate.splice import SpliceEvaluator, SpliceModel
from routesae.evaluate.targets import Target
from routesae.train.config import FitConfig, SAEConfig
from routesae.train.saes import build_sae
from routesae.train.trainer import fit

pytestmark = pytest.mark.slow


def _identity_sae(arch: str, layers: list[int], d: int = 576):
    """A real SAE whose dictionary is exactly the identity: latents [x; -x], k = d."""
    sae = build_sae(SAEConfig(arch=arch, d_model=d, n_latents=2 * d, k=d, layers=layers)).eval().requires_grad_(False)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.coder.W_enc.copy_(torch.cat([eye, -eye]))
        sae.coder.W_dec.copy_(torch.cat([eye, -eye]))
        sae.coder.b_enc.zero_()
        sae.coder.b_dec.zero_()
    return sae


def test_identity_splice_on_smollm2_is_exact(smollm2, smollm2_store):
    cache = Cache.open(smollm2_store)
    # the harvest's first batch (4 contexts): the model has run this shape already (CPU kernels
    # warm up per shape, which costs more than the forward itself)
    ids = cache.token_ids(0, 4 * 256).view(4, 256)
    keep = ~cache.special(0, 4 * 256).view(4, 256)
    # the clean run is the plain forward, bit for bit
    sm = SpliceModel(smollm2.model)
    clean = sm.clean(ids, {22}, 22)
    with torch.no_grad():
        want = smollm2.model(ids).logits.float()
    assert torch.equal(sm.logits(clean.final.reshape(-1, 576)).view_as(want), want)
    # identity TopK at layer 22 and identity RouteSAE over 7..22: nothing changes
    route = _identity_sae("routesae", list(range(7, 23)))
    ev = SpliceEvaluator(smollm2.model, [Target("topk-id", _identity_sae("topk", [22])).splicer(),
                                         Target("route-id", route).splicer()])
    ev.add_batch(ids, keep)
    for r in ev.results():
        assert abs(r.kl_per_token) < 1e-6 and abs(r.delta_ce) < 1e-6
        assert r.loss_recovered == pytest.approx(1.0, abs=1e-5)
        assert r.ce_zero > r.ce_clean + 0.1  # zero-ablation does hurt
        assert sum(r.replaced_per_layer.values()) == int(keep.sum())


def test_topk_and_routesae_from_the_smollm2_store_end_to_end_with_splice(smollm2, smollm2_store, tmp_path):
    fit(FitConfig(cache=str(smollm2_store), out=str(tmp_path / "runs"), archs=["topk", "routesae"], ks=[32],
                  latents=1152, tokens=4096, batch_size=1024, progress=False))
    r = CliRunner().invoke(main, ["eval", "--sae", str(tmp_path / "runs"), "--cache", str(smollm2_store), "--splice",
                                  "--tokens", "512", "--baselines", "none", "--quiet",
                                  "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output + r.stderr
    assert "| topk-k32 | topk | 22 | 32 | 1152 |" in r.output
    assert "| routesae-k32 | routesae | 7-22 | 32 | 1152 |" in r.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["model"]["id"] == "smollm2" and report["held_out"]
    assert report["token_range"] == [3072, 3584]
    names = [row["name"] for row in report["table"]]
    assert names == ["routesae-k32", "topk-k32"]  # (the baselines are tested on tiny models)
    for row in report["table"]:
        for key in ("l0", "normmse", "fvu", "kl_per_token", "kl_per_context", "delta_ce", "loss_recovered"):
            assert row[key] is not None and math.isfinite(row[key]), (row["name"], key)
        assert row["kl_per_token"] > 0 and row["l0"] <= 32
        assert row["ce_zero"] > row["ce_clean"]
    route = report["rows"][0]
    routing = route["cache"]["routing"]
    assert routing["layers"] == list(range(7, 23)) and sum(routing["tokens"]) == route["cache"]["n_tokens"]
    assert sum(route["splice"]["replaced_per_layer"].values()) == route["splice"]["n_positions"]
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"report.md", "report.csv", "routing.png", "firing.png"}

    # KL and CE of a fitted SAE spliced into the real model equal a float64 computation from the
    # logits of a plain forward whose block 21 is hooked to return the reconstruction
    from routesae.sae_folders import load_saes
    from routesae.model.loading import decoder_layers

    (topk,) = load_saes([str(tmp_path / "runs" / "topk-k32")], torch.device("cpu"))
    cache = Cache.open(smollm2_store)
    ids = cache.token_ids(3072, 3072 + 512).view(2, 256)
    keep = ~cache.special(3072, 3072 + 512).view(2, 256)
    ev = SpliceEvaluator(smollm2.model, [Target("topk", topk.sae).splicer()])
    ev.add_batch(ids, keep)
    (res,) = ev.results()

    def splice_hook(module, args, out):
        out = out.clone()
        out[keep] = topk.sae.reconstruct(out[keep].float()).to(out.dtype)
        return out

    with torch.no_grad():
        clean = torch.log_softmax(smollm2.model(ids).logits.double(), -1)
        handle = decoder_layers(smollm2.model)[21].register_forward_hook(splice_hook)
        try:
            spliced = torch.log_softmax(smollm2.model(ids).logits.double(), -1)
        finally:
            handle.remove()
    kl = (clean.exp() * (clean - spliced)).sum(-1)[keep]
    has_next = keep.clone()
    has_next[:, -1] = False
    nxt = torch.roll(ids, -1, 1).unsqueeze(-1)
    ce = lambda lp: -lp.gather(-1, nxt).squeeze(-1)[has_next].mean().item()  # noqa: E731
    assert res.kl_per_token == pytest.approx(kl.mean().item(), rel=1e-4)
    assert res.ce_clean == pytest.approx(ce(clean), rel=1e-5)
    assert res.ce_spliced == pytest.approx(ce(spliced), rel=1e-5)
