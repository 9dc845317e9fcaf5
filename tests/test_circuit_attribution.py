"""Integrated gradients and attribution patching over SAE latents, and top-n circuits."""

from __future__ import annotations

import torch
from routesae.circuits.attribution import (
    attribution_patching,
    integrated_gradients,
    top_n_circuit,
)
from routesae.circuits.splice import CircuitModel, PairBatch
from test_circuit_masks import PLANTED, planted_toy, random_sae
from tiny_models import tiny_model


def nearly_linear_setup(scale: float = 0.01):
    """A random Llama whose blocks after the SAE's layer add only `scale` of their output and whose
    final norm is removed: the metric is nearly linear in the layer-2 code."""
    model = tiny_model("llama", 4).float()
    with torch.no_grad():
        for block in model.model.layers[2:]:
            block.self_attn.o_proj.weight.mul_(scale)
            block.mlp.down_proj.weight.mul_(scale)
        model.model.norm = torch.nn.Identity()
        model.lm_head.weight.mul_(100.0)  # the random head's logits are tiny; linear, so no harm
    cm = CircuitModel(model, [random_sae(2, seed=2)], error="mean")
    g = torch.Generator().manual_seed(4)
    clean = torch.randint(3, 500, (3, 5), generator=g)
    clean[:, 0] = 1
    patch = clean.clone()
    patch[:, 1:] = torch.randint(3, 500, (3, 4), generator=g)
    return cm, PairBatch(clean, patch, torch.tensor([5, 6, 7]), torch.tensor([9, 10, 11]))


def test_ig_sums_to_the_metric_change_on_a_nearly_linear_model():
    cm, batch = nearly_linear_setup()
    mu = cm.means(batch.patch)
    ig = integrated_gradients(cm, batch, mu, steps=10)
    from routesae.circuits.attribution import spliced_codes

    codes = spliced_codes(cm, batch, mu)
    with torch.no_grad():
        m_clean = cm.metric(batch, mu, override={2: codes.clean[2]}).sum()
        m_patch = cm.metric(batch, mu, override={2: codes.patch[2]}).sum()
    change = float(m_clean - m_patch)
    assert abs(change) > 0.05
    assert abs(float(ig[2].sum()) - change) < 0.02 * abs(change) + 1e-4
    # attribution patching is only first order: on a nearly linear model it agrees too
    atp = attribution_patching(cm, batch, mu)
    assert abs(float(atp[2].sum()) - change) < 0.05 * abs(change) + 1e-4


def test_planted_toy_ig_and_attribution_patching_find_the_two_latents():
    cm, batch = planted_toy()
    mu = cm.means(batch.patch)
    for scores in (integrated_gradients(cm, batch, mu), attribution_patching(cm, batch, mu)):
        top = top_n_circuit(scores, 2)[1]
        assert int(top.sum()) == 2
        assert top[-1, list(PLANTED)].all()
        # latents 0 and 1 each move the metric by 2 per prompt (4 prompts)
        assert torch.allclose(scores[1][-1, list(PLANTED)], torch.full((2,), 8.0), atol=1e-4)


def test_top_n_cuts_exactly_n_nodes_across_layers():
    scores = {1: torch.tensor([[0.1, -5.0, 0.2]]), 3: torch.tensor([[3.0, 0.0, -0.3]])}
    for n in range(7):
        c = top_n_circuit(scores, n)
        assert sum(int(v.sum()) for v in c.values()) == min(n, 6)
    c = top_n_circuit(scores, 2)
    assert c[1].tolist() == [[False, True, False]] and c[3].tolist() == [[True, False, False]]


def test_gradients_do_not_touch_model_or_saes():
    cm, batch = nearly_linear_setup()
    mu = cm.means(batch.patch)
    integrated_gradients(cm, batch, mu, steps=2)
    attribution_patching(cm, batch, mu)
    params = list(cm.model.parameters()) + [p for s in cm.saes for p in s.parameters()]
    assert all(p.grad is None for p in params)


def test_ig_with_two_saes_has_every_layer():
    model = tiny_model("llama", 4).float()
    cm = CircuitModel(model, [random_sae(3, seed=3), random_sae(1, seed=1)])
    assert cm.layers == [1, 3]
    clean = torch.tensor([[1, 40, 41, 42]])
    batch = PairBatch(clean, torch.tensor([[1, 50, 51, 52]]), torch.tensor([5]), torch.tensor([6]))
    mu = cm.means(batch.patch)
    ig = integrated_gradients(cm, batch, mu, steps=3)
    assert set(ig) == {1, 3} and ig[1].shape == (3, 64)
    assert all(torch.isfinite(v).all() for v in ig.values())
