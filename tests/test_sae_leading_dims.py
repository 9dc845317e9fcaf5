"""Every architecture's public methods take any leading dimensions ([batch, seq, ...] as SAELens's
do) and give exactly the flattened call's values, reshaped."""

from __future__ import annotations

import pytest
import torch

from routesae.train.coders import Latents
from routesae.train.config import SAEConfig
from routesae.train.saes import ARCHITECTURES, build_sae

D, N_LATENTS, K, LAYERS = 16, 48, 4, [1, 2, 3]
B, S = 2, 5


def _sae(arch: str):
    multi = ARCHITECTURES[arch].multi_layer
    cfg = SAEConfig(arch=arch, d_model=D, n_latents=N_LATENTS, k=K, layers=LAYERS if multi else [2])
    sae = build_sae(cfg, torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():  # non-zero encoder biases, so the gated / jumprelu coders fire too
        for name, p in sae.coder.named_parameters():
            if name.startswith("b_"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1 + 0.2)
    return sae


def _x(arch: str, lead: tuple[int, ...]) -> torch.Tensor:
    tail = (len(LAYERS), D) if ARCHITECTURES[arch].multi_layer else (D,)
    return torch.randn(*lead, *tail, generator=torch.Generator().manual_seed(2)) * 3 + 1


ARCHS = sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_seq_input_gives_the_flattened_calls_values(arch):
    sae = _sae(arch)
    x = _x(arch, (B, S))
    flat = x.reshape(B * S, *x.shape[2:])
    per_token = (len(LAYERS),) if arch == "mlsae" else ()  # MLSAE: one code per (token, layer)

    z, z_flat = sae.encode(x), sae.encode(flat)
    assert z.shape == (B, S, *per_token, N_LATENTS)
    assert torch.equal(z.reshape(z_flat.shape), z_flat)
    assert (z_flat != 0).any()

    lat, lat_flat = sae.encode_sparse(x), sae.encode_sparse(flat)
    assert lat.values.shape[:-1] == (B, S, *per_token)
    assert torch.equal(lat.values.reshape(lat_flat.values.shape), lat_flat.values)
    assert torch.equal(lat.indices.reshape(lat_flat.indices.shape), lat_flat.indices)

    dec, dec_flat = sae.decode(z), sae.decode(z_flat)
    assert dec.shape[:-1] == z.shape[:-1] and torch.equal(dec.reshape(dec_flat.shape), dec_flat)
    sparse = sae.decode_sparse(lat)
    assert torch.equal(sparse.reshape(dec_flat.shape), sae.decode_sparse(lat_flat))

    if arch != "routesae":
        rec, rec_flat = sae.reconstruct(x), sae.reconstruct(flat)
        assert rec.shape == x.shape and torch.equal(rec.reshape(rec_flat.shape), rec_flat)


def test_routesae_route_and_reconstructions_take_leading_dims():
    sae = _sae("routesae")
    x = _x("routesae", (B, S))
    flat = x.reshape(B * S, len(LAYERS), D)
    r, r_flat = sae.route(x), sae.route(flat)
    assert r.layer_index.shape == r.weight.shape == (B, S) and r.probs.shape == (B, S, len(LAYERS))
    for a, b in zip(r, r_flat):
        assert torch.equal(a.reshape(b.shape), b)
    rec, rec_flat = sae.reconstruct(x), sae.reconstruct(flat)
    assert rec.x_hat.shape == (B, S, D) and rec.layer_index.shape == (B, S)
    for a, b in zip(rec, rec_flat):
        assert torch.equal(a.reshape(b.shape), b)
    at = sae.reconstruct_at(x, r.layer_index, r.weight)
    at_flat = sae.reconstruct_at(flat, r_flat.layer_index, r_flat.weight)
    for a, b in zip(at, at_flat):
        assert torch.equal(a.reshape(b.shape), b)
    wp, wp_flat = sae.reconstruct_with_probs(x, r.probs), sae.reconstruct_with_probs(flat, r_flat.probs)
    for a, b in zip(wp, wp_flat):
        assert torch.equal(a.reshape(b.shape), b)


@pytest.mark.parametrize("arch", ["topk", "routesae", "mlsae"])
def test_one_vector_and_deeper_leading_dims(arch):
    sae = _sae(arch)
    x = _x(arch, (2, 3, 2))
    flat = x.reshape(12, *x.shape[3:])
    assert torch.equal(sae.encode(x).reshape(-1, N_LATENTS), sae.encode(flat).reshape(-1, N_LATENTS))
    one = x[0, 0, 0]  # no leading dim at all
    z1 = sae.encode(one)
    assert z1.shape == (*((len(LAYERS),) if arch == "mlsae" else ()), N_LATENTS)
    assert torch.equal(z1.reshape(-1, N_LATENTS), sae.encode(one[None]).reshape(-1, N_LATENTS))


def test_the_historical_layouts_of_two_dim_inputs_are_kept():
    """[n, ...] inputs give what they always gave (MLSAE: token-major [n * n_layers, n_latents])."""
    x = _x("mlsae", (S,))
    assert _sae("mlsae").encode(x).shape == (S * len(LAYERS), N_LATENTS)
    assert _sae("crosscoder").decode(torch.zeros(S, N_LATENTS)).shape == (S, len(LAYERS) * D)
    lat = Latents(torch.ones(B, S, K), torch.zeros(B, S, K, dtype=torch.long))
    assert _sae("topk").decode_sparse(lat).shape == (B, S, D)


@pytest.mark.parametrize("arch", ["topk", "routesae"])
def test_a_wrong_trailing_shape_is_still_refused(arch):
    with pytest.raises(ValueError, match="expects activations"):
        _sae(arch).encode(torch.zeros(B, S, D + 1))
    with pytest.raises(ValueError, match="expects activations"):
        _sae(arch).encode(torch.zeros(D - 1))
