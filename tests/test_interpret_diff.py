"""`routesae diff` on a tiny Llama and its TopK/RouteSAE SAEs: every count against an independent
computation here (a plain forward, the SAE's dense encode per token, numpy reductions)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from routesae.cli import main
from routesae.interpret.diff import figure, mcnemar_p
from routesae.train.load import load_sae
from tiny_models import tiny_store_with_saes

A = ["The cat sat on the mat.", "A function returns a value.", "Lists hold items in order.", "Open the file first."]
B = ["An exception was raised.", "The module imports os.", "Dictionaries map keys to values.", "Close the socket."]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    model_dir = tiny_store_with_saes(root, ["topk", "routesae"], tokens=2048)
    (root / "a.txt").write_text("\n".join(A) + "\n\n")
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in B))
    return root, model_dir


def _independent(model_dir, sae, prompts, reduce):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = list(sae.config.layers)
    out = []
    for text in prompts:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        x = torch.stack([hs[layer][0, 1:].float() for layer in layers], 1)  # BOS left out
        z = sae.encode(x if len(layers) > 1 else x[:, 0]).numpy()
        out.append(z.mean(0) if reduce == "mean" else z.max(0) if reduce == "max" else z[-1])
    return np.stack(out)


@pytest.mark.parametrize("name,reduce", [("topk-k8", "max"), ("routesae-k8", "mean"), ("topk-k8", "last")])
def test_counts_exclusive_and_separating_latents_equal_an_independent_computation(world, tmp_path, name, reduce):
    root, model_dir = world
    result = CliRunner().invoke(main, ["diff", "--sae", str(root / "runs" / name), "--a", str(root / "a.txt"),
                                       "--b", str(root / "b.jsonl"), "--reduce", reduce, "--out", str(tmp_path), "--quiet",
                                       "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "diff.json").read_text())
    sae = load_sae(root / "runs" / name)
    za, zb = _independent(model_dir, sae, A, reduce), _independent(model_dir, sae, B, reduce)
    fa, fb = (za > 0).mean(0), (zb > 0).mean(0)
    assert got["a"]["active_mean"] == pytest.approx((za > 0).sum(1).mean())
    assert got["b"]["latents_used"] == int((zb > 0).any(0).sum())
    assert [r["latent"] for r in got["exclusive_a"]] == np.nonzero((fa > 0) & (fb == 0))[0].tolist()
    assert [r["latent"] for r in got["exclusive_b"]] == np.nonzero((fb > 0) & (fa == 0))[0].tolist()
    assert [r["latent"] for r in got["separating_a"]] == np.nonzero((fa == 1) & (fb == 0))[0].tolist()
    assert [r["latent"] for r in got["separating_b"]] == np.nonzero((fb == 1) & (fa == 0))[0].tolist()
    for r in got["more_in_a"]:
        assert r["freq_a"] - r["freq_b"] > 0 and r["freq_a"] == pytest.approx(fa[r["latent"]])
    paired = got["paired"]
    only_a = ((za > 0) & ~(zb > 0)).sum(0)
    assert paired["only_a_per_pair"] == pytest.approx(((za > 0) & ~(zb > 0)).sum(1).mean())
    for r in paired["mcnemar"]:
        assert r["only_a"] == only_a[r["latent"]]
    assert (tmp_path / "diff.png").stat().st_size > 1000 and "Perfectly separating" in (tmp_path / "diff.md").read_text()
    # the terminal gets a summary, not diff.md: the sets, the significant count, the top few, the files
    lines = result.output.strip().splitlines()
    assert len(lines) <= 8 and "|" not in result.output and "##" not in result.output, result.output
    assert lines[0] == f"{name}: A = {root / 'a.txt'} (4 prompts), B = {root / 'b.jsonl'} (4 prompts), {reduce} over tokens"
    only_b = ((zb > 0) & ~(za > 0)).sum(0)
    p, tested = mcnemar_p(only_a, only_b), only_a + only_b > 0
    significant, bonferroni = int((tested & (p < 0.05)).sum()), int((tested & (p * tested.sum() < 0.05)).sum())
    assert (f"paired, exact McNemar: {significant} of the {int(tested.sum())} latents with a discordant pair at "
            f"p < 0.05 ({bonferroni} with Bonferroni's correction)") in lines
    assert paired["significant"] == significant and paired["significant_bonferroni"] == bonferroni
    more_a = next(line for line in lines if line.startswith("more often in A"))
    assert [int(x) for x in re.findall(r"(\d+) \(\d\.\d\d vs", more_a)] == [r["latent"] for r in got["more_in_a"][:3]]
    assert lines[-1] == f"tables: {tmp_path / 'diff.md'}; data: {tmp_path / 'diff.json'}; figure: {tmp_path / 'diff.png'}"


def test_unpaired_sets_say_there_is_no_test(world, tmp_path):
    root, _ = world
    (tmp_path / "three.txt").write_text("\n".join(A[:3]))
    result = CliRunner().invoke(main, ["diff", "--sae", str(root / "runs" / "topk-k8"), "--a", str(tmp_path / "three.txt"),
                                       "--b", str(root / "b.jsonl"), "--out", str(tmp_path / "d"), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) <= 8 and "McNemar" not in result.output and "|" not in result.output, result.output
    assert ("not paired (the sets differ in size): no per-latent test, only the ranking by frequency "
            "difference") in lines
    assert json.loads((tmp_path / "d" / "diff.json").read_text())["paired"] is None


def _separating_world(n_prompts: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Activations of few prompts with latents that separate the sets both ways: at (1, 0) and (0, 1)."""
    rng = np.random.default_rng(seed)
    za = (rng.random((n_prompts, 40)) < 0.5) * rng.random((n_prompts, 40))
    zb = (rng.random((n_prompts, 40)) < 0.5) * rng.random((n_prompts, 40))
    za[:, :3], zb[:, :3] = 1.0, 0.0
    za[:, 3:6], zb[:, 3:6] = 0.0, 1.0
    za[:, 30:], zb[:, 30:] = 0.0, 0.0
    return za, zb


@pytest.mark.parametrize("n_prompts,seed", [(4, 0), (3, 1), (16, 2)])
def test_the_figure_has_integer_count_ticks_and_no_legend_over_the_data(n_prompts, seed):
    import matplotlib.pyplot as plt

    za, zb = _separating_world(n_prompts, seed)
    fig = figure(za, zb, "test")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        scatter_ax, hist_ax = fig.axes
        # both axes of the histogram count (latents, prompts): every tick shown is a whole number
        for axis, (lo, hi) in ((hist_ax.xaxis, hist_ax.get_xlim()), (hist_ax.yaxis, hist_ax.get_ylim())):
            ticks = [t for t in axis.get_majorticklocs() if lo <= t <= hi]
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        # a bin holds one count, not a share of two
        edges = [patch.get_x() for patch in hist_ax.patches]
        assert all((e + 0.5) == round(e + 0.5) for e in edges), edges
        sep = next(c for c in scatter_ax.collections if str(c.get_label()).startswith("perfectly separating"))
        xy = scatter_ax.transData.transform(sep.get_offsets())
        assert {tuple(p) for p in np.round(sep.get_offsets(), 6).tolist()} == {(1.0, 0.0), (0.0, 1.0)}
        radius = np.sqrt(sep.get_sizes().max()) / 2 * fig.dpi / 72  # points -> pixels
        points = (xy.min(0) - radius, xy.max(0) + radius)
        for ax in fig.axes:
            box = ax.get_legend().get_window_extent(renderer)
            inside_points = (box.x0 < points[1][0] and points[0][0] < box.x1 and box.y0 < points[1][1]
                             and points[0][1] < box.y1)
            # away from every plotted point, outside both panels, and whole on the figure
            assert not inside_points and not box.overlaps(scatter_ax.get_window_extent(renderer))
            assert not box.overlaps(hist_ax.get_window_extent(renderer)) and fig.bbox.contains(box.x0, box.y0)
            assert fig.bbox.contains(box.x1, box.y1)
    finally:
        plt.close(fig)


def test_mcnemar_p_is_the_exact_binomial_test():
    # 7 discordant pairs all one way: p = 2 * (1/2)^7; 3 vs 3: p = 1
    np.testing.assert_allclose(mcnemar_p(np.array([7, 3, 0]), np.array([0, 3, 0])), [2 / 128, 1.0, 1.0])
    x, y = 9, 2
    want = 2 * sum(math.comb(11, j) for j in range(3)) / 2**11
    assert mcnemar_p(np.array([x]), np.array([y]))[0] == pytest.approx(want)


@pytest.mark.parametrize("x,y", [(600, 500), (2600, 2400), (1100, 0)])
def test_mcnemar_p_at_thousands_of_discordant_pairs(x, y):
    # 2.0**n overflows a float past n = 1023; exact integer arithmetic (Fraction) is the reference
    from fractions import Fraction

    n = x + y
    tail = Fraction(sum(math.comb(n, j) for j in range(min(x, y) + 1)), 2**n)
    want = min(1.0, float(2 * tail))
    got = mcnemar_p(np.array([x]), np.array([y]))[0]
    assert np.isfinite(got)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_bad_input_is_one_line(world, tmp_path):
    root, _ = world
    (tmp_path / "empty.txt").write_text("\n\n")
    cases = [(["--a", str(tmp_path / "empty.txt"), "--b", "builtin:expert"], "holds no prompts"),
             (["--a", str(tmp_path / "nope.txt"), "--b", "builtin:expert"], "no prompt file")]
    for args, match in cases:
        result = CliRunner().invoke(main, ["diff", "--sae", str(root / "runs" / "topk-k8"), *args, "--out", str(tmp_path)])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and match in lines[0], result.stderr
