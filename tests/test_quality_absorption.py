"""Feature absorption (quality/absorption*.py): the SAEBench fraction on hand-computed words, hand-built
SAEs with and without an absorbing latent, every architecture's site against its own reconstruction,
the words and prompts of a real tokenizer, and the command's output and one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from routesae.errors import RouteSAEError
from routesae.quality.absorption import (AbsorptionSettings, LetterProbe, absorption_of_words, main_latents,
                                         sae_sites, score_sae)
from routesae.quality.absorption_cli import absorption
from routesae.quality.absorption_data import (MIN_WORDS, TEMPLATE, Word, build_prompts, split_words, vocab_words,
                                              word_residuals)
from routesae.train.config import SAEConfig
from routesae.train.saes import build_sae
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

LAYER = 2


# --- the fraction, by hand ------------------------------------------------------------------------
def test_absorption_fraction_and_full_absorption_by_hand():
    # 4 words, 4 latents, main latent 0; s (the share along the probe) given directly
    P = np.array([10.0, 10.0, 10.0, 10.0])
    s = np.array([[8.0, 3.0, 0.0, 0.0],    # M 8, A 3: A/P 0.3 < 0.4 -> 0
                  [0.0, 6.0, 0.0, 0.0],    # main silent, A/P 0.6 -> 1; full (s/P 0.6, cos 0.5)
                  [4.0, 5.0, 2.0, 0.0],    # M 4, A 5+2 = 7, a = min(7, 6) = 6 -> 6/10
                  [0.0, 0.0, 0.0, 9.0]])   # the only carrier has cos 0.05 < 0.1: fraction 0, yet full (>= 0.025)
    codes = np.where(s > 0, 1.0, 0.0)
    cos = np.array([0.9, 0.5, 0.2, 0.05])
    out = absorption_of_words(P, codes, s, cos, [0], AbsorptionSettings())
    assert out.fraction.tolist() == pytest.approx([0.0, 1.0, 0.6, 0.0])
    assert out.full.tolist() == [False, True, False, True]
    # M >= P and P <= 0 are never absorption
    none = absorption_of_words(np.array([3.0, -1.0]), np.ones((2, 4)), np.array([[4.0, 9, 0, 0], [0, 9, 0, 0]]),
                               cos, [0], AbsorptionSettings())
    assert none.fraction.tolist() == [0.0, 0.0] and none.full.tolist() == [False, False]


def test_main_latents_grow_only_while_f1_rises():
    # latent 2 marks every 'a' word, latent 0 half of them: k 1 is perfect, k 2 adds nothing
    y = np.array([True] * 10 + [False] * 30)
    codes = np.zeros((40, 4))
    codes[:10, 2] = 3.0
    codes[:5, 0] = 1.0
    codes[10:, 3] = 1.0
    got = main_latents(codes, y, codes, y, AbsorptionSettings())
    assert got.latents == [2] and got.f1[0] == 1.0 and len(got.f1) == 2


# --- hand-built SAEs with a known answer ------------------------------------------------------------
D = 8
E = np.eye(D, dtype=np.float32)
# test words: 14 plain 'a' words, 4 partly absorbed, 1 fully absorbed; 10 'b', 10 'c'
GROUPS_TEST = {"a_plain": 14, "a_part": 4, "a_full": 1, "b": 10, "c": 10}
GROUPS_TRAIN = {"a_plain": 40, "a_part": 8, "a_full": 1, "b": 30, "c": 30}


def _words(groups: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    rows, letters = [], []
    shape = {"a_plain": 4 * E[0], "a_part": 4 * E[0] + 2 * E[3], "a_full": 4 * E[0] + 5 * E[3],
             "b": 4 * E[1], "c": 4 * E[2]}
    for group, n in groups.items():
        for i in range(n):
            rows.append(shape[group] + 0.01 * (i % 5) * E[6])  # a harmless spread off the probe directions
            letters.append(group[0])
    return np.stack(rows).astype(np.float32), letters


def _hand_sae(absorbing: bool):
    """TopK over 4 latents (all kept), no normalization. Latent 0: 'a' (silenced by e3 when absorbing),
    1: 'b', 2: 'c', 3: reads e3 and writes 0.8 e0 + 0.6 e3 (absorbing) or e3 alone (no absorption)."""
    sae = build_sae(SAEConfig(arch="topk", d_model=D, n_latents=4, k=4, layers=[LAYER], normalization="none"),
                    torch.Generator().manual_seed(0)).eval()
    enc = np.stack([E[0] - (E[3] if absorbing else 0), E[1], E[2], 1.25 * E[3]])
    dec = np.stack([E[0], E[1], E[2], 0.8 * E[0] + 0.6 * E[3] if absorbing else E[3]])
    with torch.no_grad():
        sae.coder.W_enc.copy_(torch.from_numpy(enc))
        sae.coder.W_dec.copy_(torch.from_numpy(dec))
        sae.coder.b_enc.zero_()
        sae.coder.b_dec.zero_()
    return sae


def _hand_probe() -> dict[int, LetterProbe]:
    return {LAYER: LetterProbe(["a", "b"], np.stack([E[0], E[1]]).astype(np.float64), np.array([-1.0, -1.0]),
                               np.array([1.0, 1.0]))}


def _score(sae):
    x_tr, y_tr = _words(GROUPS_TRAIN)
    x_te, y_te = _words(GROUPS_TEST)
    return score_sae(sae, "hand", {LAYER: x_tr}, {LAYER: x_te}, y_tr, y_te, _hand_probe(), AbsorptionSettings())


def test_an_absorbing_latent_is_found_with_the_fraction_computed_by_hand():
    (site,) = _score(_hand_sae(absorbing=True))
    a, b = site.letters
    assert a.letter == "a" and a.main_latents == [0] and a.true_positives == 19
    # partly absorbed words: P 4, M = code 2 (4 - 2), s_3 = 2.5 * 0.8 = 2, a = min(2, 4 - 2) = 2 -> 2 / (2 + 2)
    # fully absorbed word: main silent (4 - 5 < 0), s_3 = 6.25 * 0.8 = 5 -> fraction 1, full
    assert a.absorption == pytest.approx((4 * 0.5 + 1 * 1.0) / 19)
    assert a.full_absorption == pytest.approx(1 / 19)
    assert a.absorbing_latents == [3]
    assert b.main_latents == [1] and b.absorption == 0.0 and b.full_absorption == 0.0
    assert site.absorption == pytest.approx((3 / 19 + 0) / 2) and site.probe_f1 == 1.0
    assert set(site.left_out) == set("cdefghijklmnopqrstuvwxyz") and site.left_out["c"] is None


def test_an_sae_without_absorption_scores_zero():
    (site,) = _score(_hand_sae(absorbing=False))
    assert [r.absorption for r in site.letters] == [0.0, 0.0]
    assert [r.full_absorption for r in site.letters] == [0.0, 0.0]
    assert site.letters[0].true_positives == 19 and site.letters[0].absorbing_latents == []


def test_too_few_known_letters_is_one_line():
    probes = _hand_probe()
    probes[LAYER] = probes[LAYER]._replace(f1=np.array([0.3, 0.5]))
    x, y = _words(GROUPS_TEST)
    with pytest.raises(RouteSAEError, match=r"knows 0 letters \(best F1 0.50 for 'b'; threshold 0.6") as e:
        score_sae(_hand_sae(True), "hand", {LAYER: x}, {LAYER: x}, y, y, probes, AbsorptionSettings())
    assert "\n" not in str(e.value)


# --- every architecture's site: its latents' shares add up to its own reconstruction ----------------
SITE_LAYERS = {"topk": [2], "routesae": [1, 2, 3], "mlsae": [1, 3], "crosscoder": [1, 2]}


@pytest.mark.parametrize("arch", sorted(SITE_LAYERS))
@pytest.mark.parametrize("normalization", ["token", "dataset"])
def test_site_shares_sum_to_the_reconstruction_along_any_direction(arch, normalization):
    layers = SITE_LAYERS[arch]
    scale = [0.5 + 0.25 * i for i in range(len(layers))] if normalization == "dataset" else None
    sae = build_sae(SAEConfig(arch=arch, d_model=16, n_latents=32, k=6, layers=layers, normalization=normalization,
                              dataset_scale=scale), torch.Generator().manual_seed(1)).eval()
    with torch.no_grad():
        sae.coder.b_dec.normal_(0, 0.3)
    gen = torch.Generator().manual_seed(2)
    residuals = {layer: (3 * torch.randn(12, 16, generator=gen) + 1).numpy() for layer in layers}
    stack = torch.from_numpy(np.stack([residuals[layer] for layer in layers], axis=1))
    rec = sae.reconstruct(stack if sae.multi_layer else stack[:, 0])
    p = torch.randn(16, generator=gen).numpy()
    p /= np.linalg.norm(p)
    sites = sae_sites(sae, residuals)
    assert len(sites) == (len(layers) if arch in ("mlsae", "crosscoder") else 1)
    b_dec = sae.coder.b_dec.detach().numpy()
    for j, (name, site) in enumerate(sites):
        if arch == "routesae":
            x_hat, x = rec.x_hat.numpy(), stack.numpy()[np.arange(12), rec.layer_index.numpy()]
            bias = b_dec
            assert name == "routed over 1..3"
            assert site.layer.tolist() == [layers[i] for i in rec.layer_index.tolist()]
        else:
            x_hat = rec.numpy() if arch == "topk" else rec.numpy()[:, j]
            x = stack.numpy()[:, j]
            bias = b_dec[j * 16:(j + 1) * 16] if arch == "crosscoder" else b_dec
            assert name == f"layer {layers[j]}" and set(site.layer.tolist()) == {layers[j]}
        shares = (site.codes @ site.decoder @ p + bias @ p) * site.scale
        assert shares == pytest.approx((x_hat - x + site.residual) @ p, rel=1e-4, abs=1e-3)


def test_mlsae_sites_from_one_encode_are_its_single_layer_views():
    """Every layer's code comes from one encode of all of them: the same code, residual and scale
    as the MLSAE's single-layer view of that layer gives (what the sites were built from before)."""
    from routesae.quality.absorption import _single_site

    sae = build_sae(SAEConfig(arch="mlsae", d_model=16, n_latents=32, k=6, layers=[1, 3], normalization="dataset",
                              dataset_scale=[0.5, 2.0]), torch.Generator().manual_seed(3)).eval()
    gen = torch.Generator().manual_seed(4)
    residuals = {layer: (2 * torch.randn(10, 16, generator=gen) + 0.5).numpy() for layer in (1, 3)}
    W_dec = sae.coder.W_dec.detach().numpy()
    sites = sae_sites(sae, residuals)
    assert [name for name, _ in sites] == ["layer 1", "layer 3"]
    for (_, site), layer in zip(sites, (1, 3)):
        view = _single_site(sae.at_layer(layer), layer, residuals[layer], W_dec)
        np.testing.assert_allclose(site.codes, view.codes, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(site.residual, view.residual, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(site.scale, view.scale, rtol=1e-6)
        assert site.layer.tolist() == view.layer.tolist() == [layer] * 10


def test_soft_routing_is_refused():
    sae = build_sae(SAEConfig(arch="routesae", d_model=16, n_latents=32, k=6, layers=[1, 2], routing="soft")).eval()
    with pytest.raises(RouteSAEError, match="soft routing"):
        sae_sites(sae, {1: np.ones((2, 16), np.float32), 2: np.ones((2, 16), np.float32)})


# --- words, prompts, residuals ---------------------------------------------------------------------
def test_vocab_words_prompts_and_the_word_position():
    tok = tiny_tokenizer()
    words = vocab_words(tok)
    assert len(words) >= MIN_WORDS
    for w in words:
        bare = w.text.removeprefix(" ")
        assert bare.isalpha() and bare.isascii() and len(bare) >= 2 and w.letter == bare[0].lower()
        assert tok.decode([w.token_id]) == w.text
    split = split_words(words, seed=3)
    assert len(split.test) == round(len(words) * 0.2) and len(split.train) + len(split.test) == len(words)
    assert split_words(words, seed=3) == split and split_words(words, seed=4) != split
    assert len(split_words(words, seed=3, max_words=60).train) == 48
    prompts = build_prompts(tok, split.test, split.train, seed=0)
    for word, prompt in zip(split.test, prompts):
        assert prompt.ids[prompt.position] == word.token_id
        text = tok.decode(prompt.ids, skip_special_tokens=True)
        lines = text.split("\n")
        assert len(lines) == 11 and text.endswith(word.text + TEMPLATE.format(word=""))
        assert all(line.endswith(f": {line[0].upper()}") for line in lines[:10])
    assert build_prompts(tok, split.test, split.train, seed=0) == prompts


def test_word_residuals_equal_an_unbatched_forward():
    tok = tiny_tokenizer()
    model = tiny_model("llama").float()
    split = split_words(vocab_words(tok), seed=0, max_words=60)
    prompts = build_prompts(tok, split.test, split.train, seed=0)
    got = word_residuals(model, prompts, [1, 3], batch_size=5, pad_id=0, progress=False)
    assert got[1].shape == (len(prompts), 64)
    with torch.no_grad():
        for i in (0, 7, len(prompts) - 1):
            hidden = model(input_ids=torch.tensor([prompts[i].ids]), output_hidden_states=True).hidden_states
            for layer in (1, 3):
                assert got[layer][i] == pytest.approx(hidden[layer][0, prompts[i].position].numpy(), abs=1e-4)


class _DigitsTokenizer:
    """A vocabulary of numbers and punctuation: no word at all."""

    all_special_ids = [0]

    def __len__(self) -> int:
        return 300

    def batch_decode(self, ids):
        return [f" {i[0]}" if i[0] % 2 else f"{i[0]}!" for i in ids]


def test_a_vocabulary_without_words_is_one_line():
    assert vocab_words(_DigitsTokenizer()) == []
    with pytest.raises(RouteSAEError, match=r"has 0 single-token alphabetic words \(at least 52 needed\)"):
        split_words([], what="the tokenizer of digits")
    with pytest.raises(RouteSAEError, match="has 3 single-token"):
        split_words([Word(i, "ab", "a") for i in range(3)])


# --- the command -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama folder; a random TopK SAE on its layer 2 and a RouteSAE over 1..3 that record it."""
    from routesae.model.loading import load_model

    root = tmp_path_factory.mktemp("absorption")
    model_dir = save_tiny("llama", root / "model")
    info = load_model(str(model_dir), "float32", "cpu").info
    out = []
    for arch, layers in (("topk", [2]), ("routesae", [1, 2, 3])):
        sae = build_sae(SAEConfig(arch=arch, d_model=64, n_latents=128, k=8, layers=layers),
                        torch.Generator().manual_seed(0))
        folder = root / "runs" / f"{arch}-k8"
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sae.export_tensors().items()}, str(folder / "sae.safetensors"))
        (folder / "config.json").write_text(json.dumps({**sae.config.to_dict(), "model": info, "training": {}}))
        out.append(folder)
    return out[0], out[1]


def test_the_command_writes_its_report_and_one_line_per_sae(sae_dirs, tmp_path):
    topk, _ = sae_dirs
    r = CliRunner().invoke(absorption, ["--sae", str(topk.parent), "--out", str(tmp_path / "abs"),
                                        "--min-probe-f1", "0",
                                        "--device", "cpu", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("routesae-k8 (routesae, layers 1..3): absorption ")
    assert lines[1].startswith("topk-k8 (topk, layer 2): absorption ")
    assert all("probe F1" in line for line in lines[:2]) and "below 0 are left out" in lines[2]
    data = json.loads((tmp_path / "abs" / "absorption.json").read_text())
    assert [s["name"] for s in data["saes"]] == ["routesae-k8", "topk-k8"]
    assert sorted(data["probes"]) == ["1", "2", "3"]
    for s in data["saes"]:
        assert 0 <= s["absorption"] <= 1 and 0 <= s["full_absorption"] <= 1
        for site in s["sites"]:
            for letter in site["letters"]:
                assert math.isfinite(letter["probe_f1"]) and letter["true_positives"] <= letter["test_words"]
    md = (tmp_path / "abs" / "absorption.md").read_text()
    assert "| routesae-k8 | routesae | routed over 1..3 |" in md and "| topk-k8 | topk | layer 2 |" in md
    assert not data["poor_speller"]


def test_the_command_refuses_when_the_probe_knows_too_few_letters(sae_dirs, tmp_path):
    topk, _ = sae_dirs
    r = CliRunner().invoke(absorption, ["--sae", str(topk), "--out", str(tmp_path / "abs"), "--min-letters", "26",
                                        "--device", "cpu", "--quiet"])
    assert r.exit_code != 0 and isinstance(r.exception, RouteSAEError)
    assert "first-letter probe knows" in str(r.exception) and "\n" not in str(r.exception)
    assert not (tmp_path / "abs" / "absorption.json").exists()


def test_the_command_module_imports_nothing_heavy():
    code = ("import sys, routesae.quality.absorption_cli\n"
            "print([m for m in ('torch', 'transformers', 'zarr', 'scipy', 'sklearn') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr
