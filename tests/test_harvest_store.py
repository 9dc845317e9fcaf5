"""Harvest on tiny random-weight models: stored activations, packing, provenance, statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from routesae import Cache
from routesae.harvest.corpus import builtin_documents
from routesae.harvest.packing import PackState, pack_contexts
from routesae.harvest.run import HarvestConfig, run_harvest

CTX = 32


def _harvest(model_dir, out, **kw):
    cfg = dict(out=str(out), model=str(model_dir), dataset="builtin", tokens=1024, layers="all",
               context_len=CTX, batch_size=4, progress=False, min_chunk_bytes=1024)
    cfg.update(kw)
    return run_harvest(HarvestConfig(**cfg))


@pytest.mark.parametrize("kind,dtype", [("llama", "float32"), ("gpt2", "float32"), ("llama", "bfloat16")])
def test_stored_acts_equal_output_hidden_states(kind, dtype, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    folder = tiny_llama_dir if kind == "llama" else tiny_gpt2_dir
    cache = _harvest(folder, tmp_path / "s.zarr", dtype=dtype, compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    assert cache.layers == list(range(model.config.num_hidden_layers + 1))
    assert cache.n_tokens == 1024 and cache.complete
    ids = cache.token_ids(0, cache.n_tokens).view(-1, CTX)
    with torch.no_grad():
        hidden = model(ids[:4], output_hidden_states=True).hidden_states  # the same batch harvest ran
    for layer in cache.layers:
        want = hidden[layer].reshape(-1, cache.d_model).float()
        got = cache.acts(layer, 0, 4 * CTX)
        tol = 0 if dtype == "float32" else 1e-2  # bf16 storage of a bf16 model: its own rounding
        torch.testing.assert_close(got, want, rtol=tol or 1e-5, atol=tol or 1e-5)


def test_packing_has_bos_first_eos_between_docs_and_no_pad(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    docs = ["first document here.", "", "second one, a little longer than the first.", "third " * 40]
    contexts = list(pack_contexts(lambda: iter(docs), tok, 16))
    ids = np.stack([c for c, _ in contexts])
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert not (ids == tok.pad_token_id).any()
    stream = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs if d])
    body = ids[:, 1:].reshape(-1)
    assert len(stream) - len(body) < 15  # only the trailing partial context is dropped
    np.testing.assert_array_equal(body, stream[: len(body)])


def test_packing_resumes_at_the_exact_token(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    docs = lambda: (d for d in builtin_documents() if len(d) < 3000)  # noqa: E731
    packed = list(itertools.islice(pack_contexts(docs, tok, 24), 60))
    for k in (1, 7, 33):
        again = list(itertools.islice(pack_contexts(docs, tok, 24, packed[k - 1][1]), 60 - k))
        assert len(again) == 60 - k
        assert all(np.array_equal(a, b) and sa == sb for (a, sa), (b, sb) in zip(again, packed[k:]))
    assert packed[0][1] != PackState()


def test_token_arrays_flags_and_stats(tiny_llama_dir, tmp_path):
    cache = _harvest(tiny_llama_dir, tmp_path / "s.zarr", layers="1,3", dtype="float32")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids, pos, special = cache.token_ids(), cache.positions(), cache.special()
    assert torch.equal(pos, torch.arange(cache.n_tokens) % CTX)
    assert torch.equal(special, (ids == tok.bos_token_id) | (ids == tok.eos_token_id) | (ids == tok.pad_token_id))
    assert special[pos == 0].all()
    for layer in (1, 3):
        x = cache.acts(layer, 0, cache.n_tokens)[~special].double()
        s = cache.stats(layer)
        assert s.count == int((~special).sum())
        torch.testing.assert_close(s.mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
        assert s.mean_sq_norm == pytest.approx(float(x.pow(2).sum(1).mean()), rel=1e-6)
        assert s.mean_norm == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-6)
    m = cache.model
    assert m["n_layers"] == 4 and m["d_model"] == 64 and m["dtype"] == "float32" and m["revision"].startswith("local-")
    assert cache.attrs["dataset"]["id"] == "builtin" and cache.context_len == CTX
    assert cache.routed_layers() == [1, 3] and cache.default_layer() == 3


def test_store_chunking_reads_are_tight(tiny_llama_dir, tmp_path):
    """One layer of a block, or all layers of it, reads chunks that hold just those tokens."""
    cache = _harvest(tiny_llama_dir, tmp_path / "s.zarr", layers="middle", dtype="float32", tokens=4096)
    lay = cache.layout
    arr = cache._arrays[cache.layers[0]]
    assert arr.chunks == (lay.chunk_tokens, 64) and arr.shards == (lay.shard_tokens, 64)
    assert lay.chunk_tokens % CTX == 0 and lay.shard_tokens % lay.chunk_tokens == 0
    assert lay.chunk_tokens * 64 * 4 >= 1024  # min_chunk_bytes asked for by _harvest


def test_dataset_ends_before_budget(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "small.jsonl"
    corpus.write_text("\n".join('{"text": "%s"}' % ("word " * 50) for _ in range(6)))
    cache = _harvest(tiny_llama_dir, tmp_path / "s.zarr", dataset=str(corpus), tokens=100_000, layers="2")
    assert cache.complete and 0 < cache.n_tokens < 100_000 and cache.n_tokens % CTX == 0
    assert cache._arrays[2].shape[0] == cache.n_tokens
    assert Cache.open(tmp_path / "s.zarr").n_tokens == cache.n_tokens


def test_the_builtin_corpus_halves_stand_alone():
    # builtin is the pydoc topics, then the docstrings; each half on its own is other text than the other
    from routesae.harvest.corpus import document_source
    from pydoc_data.topics import topics

    whole = document_source("builtin")
    first = list(itertools.islice(whole(), len(topics) + 5))
    assert list(itertools.islice(document_source("builtin:topics")(), len(topics) + 5)) == first[: len(topics)]
    docstrings = list(itertools.islice(document_source("builtin:docstrings")(), 5))
    assert docstrings == first[len(topics):] and not set(docstrings) & set(first[: len(topics)])
