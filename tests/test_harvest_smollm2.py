"""End to end on the real offline SmolLM2-135M-Instruct: harvest, then check against a plain forward."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from routesae import Cache
from routesae.cli import main


def test_smollm2_store_matches_plain_forward(smollm2_store, smollm2):
    cache = Cache.open(smollm2_store, require_complete=True)
    assert cache.model["n_layers"] == 30 and cache.d_model == 576 and cache.storage_dtype == "bfloat16"
    assert cache.layers == list(range(7, 23)) == cache.routed_layers() and cache.default_layer() == 22
    assert cache.n_tokens == 4096 and cache.context_len == 256

    ids = cache.token_ids(0, 4 * 256).view(4, 256)  # the first forward batch of the harvest
    assert (ids[:, 0] == smollm2.tokenizer.bos_token_id).all()
    with torch.no_grad():
        hidden = smollm2.model(ids, output_hidden_states=True).hidden_states
    for layer in (7, 15, 22):
        got = cache.acts_stored(layer, 0, 4 * 256)
        want = hidden[layer].reshape(-1, 576)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)

    # BOS carries a huge norm; statistics leave it (and EOS) out.
    special = cache.special()
    bos_norm = cache.acts(22, 0, 256)[0].norm()
    assert bos_norm > 5 * cache.stats(22).mean_norm
    assert cache.stats(22).count == int((~special).sum())


def test_info_command(smollm2_store):
    r = CliRunner().invoke(main, ["info", str(smollm2_store)])
    assert r.exit_code == 0, r.output
    assert "LlamaForCausalLM" in r.output and "4,096" in r.output
    assert "uncompressed; 1,152 bytes per token per layer" in r.output  # the default, not a ratio of 0.99x
    r = CliRunner().invoke(main, ["info", "--json", str(smollm2_store)])
    import json
    summary = json.loads(r.output)
    assert summary["n_tokens"] == 4096 and summary["compression_ratio"] is None
    assert summary["bytes_per_token_per_layer"] == 576 * 2 and summary["damaged_files"] == []
    assert 0.99 < summary["act_bytes_raw"] / summary["act_bytes_on_disk"] <= 1.0
    assert set(summary["layer_stats"]) == {str(i) for i in range(7, 23)}
