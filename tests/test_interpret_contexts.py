"""`routesae contexts` end to end on a tiny Llama's store: every recorded figure against a brute-force
pass written here from formats.md (dense codes of every held-out token, windows cut by hand)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from routesae.cli import main
from routesae.sae_folders import held_out_range, load_saes
from routesae.store.zarr_store import Cache
from tiny_models import tiny_store_with_saes

CTX, THRESHOLD = 32, 1.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("contexts")
    tiny_store_with_saes(root, ["topk", "routesae", "mlsae", "vanilla"])
    result = _run("--sae", root / "runs", "--cache", root / "s.zarr", "--out", root / "ctx", "--threshold", THRESHOLD,
                  "--top", 6, "--left", 4, "--right", 2, "--quiet")
    assert result.exit_code == 0, result.output
    return root, result


def _run(*args):
    return CliRunner().invoke(main, ["contexts", *map(str, args)])


def _read(folder):
    manifest = json.loads((folder / "contexts.json").read_text())
    latents = [json.loads(line) for line in (folder / "latents.jsonl").read_text().splitlines()]
    return manifest, latents


def _brute(root, name):
    """Dense codes of every held-out token, the layer each came from, and the tokens' texts."""
    cache = Cache.open(root / "s.zarr")
    (s,) = load_saes([str(root / "runs" / name)], torch.device("cpu"))
    start, stop = held_out_range(cache, [s])
    special = cache.special(start, stop).numpy()
    ids = cache.token_ids(start, stop).numpy()
    layers = list(s.sae.config.layers)
    acts = torch.stack([cache.acts(layer, start, stop).float() for layer in layers], 1)
    layer = None
    if name.startswith("mlsae"):
        per_layer = torch.stack([s.sae.at_layer(lay).encode(acts[:, i]) for i, lay in enumerate(layers)], 1)
        z, layer = per_layer.max(1)
    elif name.startswith("routesae"):
        z = s.sae.encode(acts)
        layer = s.sae.route(acts).layer_index[:, None].expand_as(z)
    else:
        z = s.sae.encode(acts[:, 0])
    z = z.numpy()
    z[special] = 0
    return cache, s, start, special, ids, z, None if layer is None else np.asarray(layers)[layer.numpy()]


@pytest.mark.parametrize("name", ["topk-k8", "routesae-k8", "mlsae-k8", "vanilla-k8"])
def test_every_recorded_figure_equals_a_brute_force_pass(world, name):
    root, _ = world
    manifest, latents = _read(root / "ctx" / name)
    cache, s, start, special, ids, z, layer_of = _brute(root, name)
    assert manifest["complete"] and manifest["tokens"][0] == start and manifest["n_tokens"] == int((~special).sum())
    assert len(latents) == s.sae.config.n_latents == z.shape[1]
    tokenizer_texts = json.loads((root / "ctx" / name / "tokens.json").read_text())
    left, right = 4, 2

    def window(t):  # the store index t's window, cut by hand
        a = t
        while a > t - left and (a - start) % CTX and not special[a - 1 - start]:
            a -= 1
        b = t + 1
        while b <= t + right and (b - start) % CTX and not special[b - start]:
            b += 1
        return a, b

    interpretable = 0
    for lat, rec in enumerate(latents):
        col = z[:, lat]
        assert rec["latent"] == lat and rec["count"] == int((col > 0).sum())
        assert sum(rec["histogram"]) == rec["count"]
        assert rec["max"] == pytest.approx(float(col.max()), rel=1e-5, abs=1e-6)
        if layer_of is not None and rec["count"]:
            want = [int(((col > 0) & (layer_of[:, lat] == lay)).sum()) for lay in manifest["layers"]]
            assert rec["layers"] == want
        # top: greedy non-overlapping largest, windows cut at specials and context edges
        order = sorted(np.nonzero(col)[0], key=lambda i: (-col[i], i))
        kept = []
        for i in order:
            w = window(start + int(i))
            if all(not (w[0] < b and a < w[1]) for a, b in kept):
                kept.append(w)
            if len(kept) == 6:
                break
        assert [(ex["start"], ex["start"] + len(ex["token_ids"])) for ex in rec["top"]] == kept
        examples = rec["top"] + [e for q in rec["quantiles"] for e in q] + rec["samples"]
        for ex in examples:
            t, a = ex["token_index"], ex["start"]
            assert (ex["start"], ex["start"] + len(ex["token_ids"])) == window(t) and t - a == ex["mark"]
            assert ex["token_ids"] == ids[a - start:a - start + len(ex["token_ids"])].tolist()
            assert ex["activation"] == pytest.approx(float(col[t - start]), rel=1e-4)
            np.testing.assert_allclose(ex["acts"], col[a - start:a - start + len(ex["acts"])], rtol=2e-3, atol=1e-4)
            if layer_of is not None:
                assert ex["layer"] == layer_of[t - start, lat]
        spans = [(ex["start"], ex["start"] + len(ex["token_ids"])) for ex in examples]
        assert all(not (p[0] < q[1] and q[0] < p[1]) for i, p in enumerate(spans) for q in spans[i + 1:])
        for ex in rec["negatives"]:
            a, b = ex["start"] - start, ex["start"] - start + len(ex["token_ids"])
            assert (col[a:b] == 0).all() and not special[a:b].any()
            assert all(not (ex["start"] < q and p < ex["start"] + len(ex["token_ids"])) for p, q in spans)
        # the paper's rule, from the definition
        groups: dict[str, list[float]] = {}
        for i in np.nonzero(col > THRESHOLD)[0]:
            groups.setdefault(tokenizer_texts[ids[i]].lower(), []).append(float(col[i]))
        if len(groups) > 32:
            assert rec["paper"] is None and not rec["interpretable"]
            continue
        n_ctx = sum(min(2, len(v)) for v in groups.values())
        assert len(rec["paper"]) == n_ctx and rec["paper_distinct"] == len(groups)
        assert rec["interpretable"] == (n_ctx >= 4)
        interpretable += rec["interpretable"]
        for ex in rec["paper"]:
            a, b = ex["start"] - start, ex["start"] - start + len(ex["token_ids"])
            assert a <= ex["token_index"] - start < b and not special[a:b].any()
    assert manifest["paper_rule"]["interpretable"] == interpretable
    assert any(r["top"] for r in latents)


def test_counts_sit_side_by_side_and_a_rerun_is_free(world):
    root, result = world
    for name in ("topk-k8", "routesae-k8", "mlsae-k8", "vanilla-k8"):
        assert f"| {name} |" in result.output
    assert "| SAE | latents | interpretable (> 1) |" in (root / "ctx" / "counts.md").read_text()
    again = _run("--sae", root / "runs" / "topk-k8", "--cache", root / "s.zarr", "--out", root / "ctx" / "topk-k8",
                 "--threshold", THRESHOLD, "--top", 6, "--left", 4, "--right", 2, "--quiet")
    assert again.exit_code == 0 and "already there" in again.output


def test_an_unfinished_folder_is_started_over_and_ends_the_same(world, tmp_path):
    root, _ = world
    done = root / "ctx" / "topk-k8"
    out = tmp_path / "ctx"
    shutil.copytree(done, out)
    (out / "contexts.json").unlink()  # a pass killed before its manifest: the rest looks finished but is not
    (out / "latents.jsonl").write_text("{\"latent\": 0}\n")
    args = ("--sae", root / "runs" / "topk-k8", "--cache", root / "s.zarr", "--out", out, "--threshold", THRESHOLD,
            "--top", 6, "--left", 4, "--right", 2, "--quiet")
    result = _run(*args)
    assert result.exit_code == 0 and "wrote" in result.output, result.output
    assert (out / "latents.jsonl").read_bytes() == (done / "latents.jsonl").read_bytes()
    other = _run(*args[:-1], "--top", 3, "--quiet")  # other settings over finished contexts: refused
    assert other.exit_code == 1 and "--overwrite" in other.stderr
    assert (out / "latents.jsonl").read_bytes() == (done / "latents.jsonl").read_bytes()


def _one_line_error(result, match):
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("routesae: error:") and match in lines[0], result.stderr


def test_bad_input_is_one_line(world, tmp_path):
    root, _ = world
    sae = root / "runs" / "topk-k8"
    store = tmp_path / "s.zarr"
    shutil.copytree(root / "s.zarr", store)
    shutil.rmtree(store / "token_ids")
    _one_line_error(_run("--sae", sae, "--cache", store, "--out", tmp_path / "o"), "token ids")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _one_line_error(_run("--sae", sae, "--cache", root / "s.zarr", "--out", tmp_path / "busy"), "not a contexts folder")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    _one_line_error(_run("--sae", sae, "--cache", root / "s.zarr", "--out", tmp_path / "o", "--top", 0), "--top")
