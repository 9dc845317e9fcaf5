"""`routesae eval` end to end on a tiny Llama (harvest -> fit -> eval --splice), and its bad inputs:
one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

from routesae.cli import main
from routesae.harvest.run import HarvestConfig, run_harvest
from routesae.train.config import FitConfig
from routesae.train.trainer import fit
from tiny_models import save_tiny, tiny_model

CTX = 32


def _harvest(model_dir, out, layers="all", tokens=2048):
    return run_harvest(HarvestConfig(out=str(out), model=str(model_dir), dataset="builtin", tokens=tokens, layers=layers,
                                     context_len=CTX, batch_size=8, progress=False, min_chunk_bytes=1024,
                                     compute_dtype="bfloat16"))  # stored as computed: eval may start from it


def _fit(store, out, archs, routing="hard", eval_tokens=0.25, layer=3, ks=(8,)):
    fit(FitConfig(cache=str(store), out=str(out), archs=archs, ks=list(ks), latents=128, batch_size=256, routing=routing,
                  eval_tokens=eval_tokens, layer=layer, routed_layers=[1, 2, 3], progress=False, tokens=2048))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama saved to a folder, a store of all its layers, and fitted SAEs."""
    root = tmp_path_factory.mktemp("evalcli")
    model_dir = save_tiny("llama", root / "model")
    _harvest(model_dir, root / "s.zarr")
    _fit(root / "s.zarr", root / "runs", ["topk", "routesae"], ks=(8, 16))
    _fit(root / "s.zarr", root / "soft", ["routesae"], routing="soft")
    return root


def _run(*args):
    result = CliRunner().invoke(main, ["eval", *map(str, args)])
    return result


def _one_line_error(result, match):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("routesae: error:"), result.stderr
    assert match in lines[0], lines[0]


def test_eval_splice_end_to_end_writes_markdown_json_csv_and_plots(world, tmp_path):
    runs = world / "runs"
    r = _run("--sae", runs / "topk-k8", runs / "routesae-k8", "--cache", world / "s.zarr", "--splice", "--quiet",
             "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv", "--plots", tmp_path / "plots")
    assert r.exit_code == 0, r.output + r.stderr
    assert "| topk-k8 | topk | 3 |" in r.output and "| routesae-k8 | routesae | 1-3 |" in r.output
    assert "KL/context (paper)" in r.output and "keep their original activations" in r.output
    report = json.loads((tmp_path / "r.json").read_text())
    names = [row["name"] for row in report["table"]]
    assert names == ["topk-k8", "routesae-k8", "routesae-k8 [uniform]", "routesae-k8 [random-layer]"]
    assert report["held_out"] and report["token_range"] == [1536, 2048]
    for row in report["table"]:
        for key in ("l0", "normmse", "fvu", "dead_fraction", "kl_per_token", "kl_per_context", "delta_ce", "loss_recovered"):
            assert row[key] is not None and math.isfinite(row[key]), (row["name"], key)
        assert row["kl_per_token"] > 0
        # the paper-style figure is the per-token one summed over a context's non-special positions
        assert row["kl_per_context"] == pytest.approx(row["kl_per_token"] * report["rows"][0]["splice"]["n_positions"]
                                                      / report["rows"][0]["splice"]["n_contexts"], rel=1e-6)
    route = report["rows"][1]
    assert sum(route["cache"]["routing"]["tokens"]) == route["cache"]["n_tokens"]
    # each non-special token of the 16 held-out contexts is spliced exactly once
    assert sum(route["splice"]["replaced_per_layer"].values()) == route["splice"]["n_positions"]
    with open(tmp_path / "r.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["name"] for row in rows] == names and float(rows[0]["kl_per_token"]) > 0
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"routing.png", "firing.png"}


def test_eval_without_splice_needs_no_model_and_tokens_caps_whole_contexts(world, tmp_path):
    shutil.copytree(world / "runs", tmp_path / "runs")
    r = _run("--sae", tmp_path / "runs", "--cache", world / "s.zarr", "--quiet", "--tokens", "100",
             "--baselines", "none", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["token_range"] == [1536, 1536 + 3 * CTX]
    # the fit folder stands for its SAEs
    assert [row["name"] for row in report["table"]] == ["routesae-k16", "routesae-k8", "topk-k16", "topk-k8"]
    assert all(row["kl_per_token"] is None for row in report["table"])
    assert (tmp_path / "out" / "report.md").read_text().startswith("eval on")
    # several k of one architecture: metrics against L0
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"report.csv", "routing.png", "firing.png", "metrics_vs_l0.png"}


def test_soft_routing_splice_says_why_once_and_splices_the_random_layer_baseline(world, tmp_path):
    r = _run("--sae", world / "soft", "--cache", world / "s.zarr", "--splice", "--quiet", "--baselines", "both",
             "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.count("no single layer to be spliced into") == 1  # one note, not one per row
    assert r.stderr.count("routesae: note: Not spliced: soft, soft [uniform]:") == 1, r.stderr
    assert "| soft | routesae | 1-3 |" in r.output
    rows = {row["name"]: row for row in json.loads((tmp_path / "r.json").read_text())["table"]}
    assert rows["soft"]["kl_per_token"] is None and rows["soft [uniform]"]["kl_per_token"] is None
    assert rows["soft"]["normmse"] is not None  # the cache metrics stay
    # one-hot routing is one layer per token (p = 1) even for a soft-routed dictionary: it splices
    random_layer = rows["soft [random-layer]"]
    assert random_layer["kl_per_token"] > 0 and math.isfinite(random_layer["loss_recovered"])
    assert random_layer["fvu"] is not None


def test_sae_of_another_model_is_refused(world, tiny_gpt2_dir, tmp_path):
    _harvest(tiny_gpt2_dir, tmp_path / "g.zarr", tokens=512)
    r = _run("--sae", world / "runs" / "topk-k8", "--cache", tmp_path / "g.zarr", "--all-tokens")
    _one_line_error(r, "was trained on model")


def test_sae_of_layers_the_store_lacks_is_refused(world, tmp_path):
    _harvest(world / "model", tmp_path / "few.zarr", layers="0,1", tokens=512)
    r = _run("--sae", world / "runs" / "topk-k8", "--cache", tmp_path / "few.zarr", "--all-tokens")
    _one_line_error(r, "has no layer [3]")


def test_sae_of_another_store_needs_all_tokens(world, tmp_path):
    _harvest(world / "model", tmp_path / "other.zarr", tokens=512)
    r = _run("--sae", world / "runs" / "topk-k8", "--cache", tmp_path / "other.zarr")
    _one_line_error(r, "--all-tokens")
    ok = _run("--sae", world / "runs" / "topk-k8", "--cache", tmp_path / "other.zarr", "--all-tokens", "--quiet")
    assert ok.exit_code == 0 and "whole store" in ok.output


def test_empty_held_out_tail_is_refused(world, tmp_path):
    _fit(world / "s.zarr", tmp_path / "all", ["topk"], eval_tokens=0)
    _one_line_error(_run("--sae", tmp_path / "all", "--cache", world / "s.zarr"), "held-out tail")


def test_changed_or_missing_model_is_refused_for_splice(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "m")
    _harvest(model_dir, tmp_path / "s.zarr", tokens=512)
    _fit(tmp_path / "s.zarr", tmp_path / "r", ["topk"], eval_tokens=0.25)
    args = ("--sae", tmp_path / "r", "--cache", tmp_path / "s.zarr", "--splice", "--quiet")
    tiny_model("llama", seed=1).save_pretrained(model_dir)  # other weights at the same path
    _one_line_error(_run(*args), "revision")
    shutil.rmtree(model_dir)
    _one_line_error(_run(*args), "not a model folder")


@pytest.mark.parametrize("extra,match", [
    (("--tokens", "10"), "less than one context"),
    (("--baselines", "nope"), "unknown baseline"),
    (("--batch-size", "0"), "at least 1"),
])
def test_bad_arguments(world, extra, match):
    _one_line_error(_run("--sae", world / "runs" / "topk-k8", "--cache", world / "s.zarr", *extra), match)


def test_missing_sae_and_missing_store(world, tmp_path):
    _one_line_error(_run("--sae", tmp_path / "nope", "--cache", world / "s.zarr"), "no SAE")
    _one_line_error(_run("--sae", world / "runs" / "topk-k8", "--cache", tmp_path / "nope.zarr"), "no store")
    _one_line_error(_run("--cache", world / "s.zarr"), "no SAE given")


def test_store_prefix_gives_the_live_numbers(world):
    # one context run live shows the store equal to this machine's forward, so both batches' clean
    # runs start from the store, and every number equals the all-live evaluation's
    from routesae.evaluate.run import EvalConfig, run_eval

    def run(prefix):
        return run_eval(EvalConfig(saes=[str(world / "runs" / "topk-k8"), str(world / "runs" / "routesae-k8")],
                                   cache=str(world / "s.zarr"), splice=True, prefix=prefix, baselines=["random-layer"],
                                   progress=False))

    auto, live = run("auto"), run("live")
    assert auto.splice_batches == {"live": 0, "store": 2} and live.splice_batches == {"live": 2, "store": 0}
    assert [r.splice for r in auto.rows] == [r.splice for r in live.rows]
    assert any("started from the store" in n for n in auto.notes)


def test_python_api_matches(world):
    # the same numbers come out of the Python entry point the CLI wraps
    from routesae.evaluate.run import EvalConfig, run_eval

    rep = run_eval(EvalConfig(saes=[str(world / "runs" / "topk-k8")], cache=str(world / "s.zarr"), progress=False,
                              tokens=64))
    assert rep.rows[0].cache.n_tokens == rep.n_tokens > 0
    assert torch.isfinite(torch.tensor(rep.rows[0].cache.normmse))


def test_eval_batches_default_to_the_harvests(tmp_path):
    # a store harvested 4 contexts per forward: eval's default batches line up with those (4 batches
    # here), so where kernels round differently with the batch's size a whole live batch can still
    # show the store equal; on this CPU one probe context does, and every batch starts from the store
    from routesae.evaluate.run import EvalConfig, run_eval
    from routesae.store.zarr_store import Cache

    model_dir = save_tiny("llama", tmp_path / "model")
    # a bf16 forward, stored as it is (the default on a CPU without bf16 computes in float32 and
    # rounds, which no rerun of the forward can start from)
    run_harvest(HarvestConfig(out=str(tmp_path / "s.zarr"), model=str(model_dir), dataset="builtin", tokens=2048,
                              layers="all", context_len=CTX, batch_size=4, progress=False, min_chunk_bytes=1024,
                              compute_dtype="bfloat16"))
    assert Cache.open(tmp_path / "s.zarr").harvest_batch_size == 4
    _fit(tmp_path / "s.zarr", tmp_path / "runs", ["topk"])
    report = run_eval(EvalConfig(saes=[str(tmp_path / "runs")], cache=str(tmp_path / "s.zarr"), splice=True,
                                 progress=False))
    assert report.splice_batches == {"live": 0, "store": 4}
    live = run_eval(EvalConfig(saes=[str(tmp_path / "runs")], cache=str(tmp_path / "s.zarr"), splice=True,
                               prefix="live", progress=False))
    assert [r.splice for r in report.rows] == [r.splice for r in live.rows]


def test_every_single_layer_architecture_is_scored_and_spliced(world, tmp_path):
    archs = ["batchtopk", "vanilla", "gated", "jumprelu"]
    _fit(world / "s.zarr", tmp_path / "base", archs)
    r = _run("--sae", tmp_path / "base", "--cache", world / "s.zarr", "--splice", "--quiet", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    rows = {row["arch"]: row for row in json.loads((tmp_path / "r.json").read_text())["table"]}
    assert set(rows) == set(archs)
    for arch, row in rows.items():
        for key in ("l0", "normmse", "fvu", "kl_per_token", "delta_ce", "loss_recovered"):
            assert row[key] is not None and math.isfinite(row[key]), (arch, key)
        assert row["kl_per_token"] > 0 and row["layers"] == "3"


def test_rows_at_different_l0_are_flagged(world):
    from routesae.evaluate.run import EvalConfig, l0_mismatch, run_eval

    report = run_eval(EvalConfig(saes=[str(world / "runs" / "topk-k8"), str(world / "runs" / "topk-k16")],
                                 cache=str(world / "s.zarr"), progress=False))
    note = l0_mismatch(report.rows)
    assert note and "8.0 for topk-k8, 16.0 for topk-k16" in note and note in report.notes
    same = run_eval(EvalConfig(saes=[str(world / "runs" / "topk-k8"), str(world / "runs" / "routesae-k8")],
                               cache=str(world / "s.zarr"), baselines=[], progress=False))
    assert l0_mismatch(same.rows) is None and not any("L0 differs" in n for n in same.notes)


@pytest.mark.parametrize("arch", ["mlsae", "crosscoder", "crosscoder-relu"])
def test_multi_layer_saes_are_spliced_one_layer_at_a_time_and_averaged(world, tmp_path, arch):
    _fit(world / "s.zarr", tmp_path / "ml", [arch])
    r = _run("--sae", tmp_path / "ml", "--cache", world / "s.zarr", "--splice", "--quiet", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    names = [row["name"] for row in report["table"]]
    assert names == ["ml @1", "ml @2", "ml @3", "ml (mean of 3 layers)"]
    per_layer, mean = report["rows"][:3], report["rows"][3]
    for layer, row in zip((1, 2, 3), per_layer):
        # each pass replaced every non-special position at its own layer, and nowhere else
        assert row["splice"]["replaced_per_layer"] == {str(layer): row["splice"]["n_positions"]}
        assert row["layer_of"] == "ml"
        if arch != "crosscoder-relu":  # TopK: k; the L1 form's L0 is steered (and these fits take 8 steps)
            assert row["cache"]["l0"] == pytest.approx(8.0)
    if arch.startswith("crosscoder"):  # one code for all layers: the same L0 on every row
        assert len({row["cache"]["l0"] for row in per_layer}) == 1
    for key in ("kl_per_token", "delta_ce", "loss_recovered"):
        assert mean["splice"][key] == pytest.approx(sum(row["splice"][key] for row in per_layer) / 3)
    assert report["table"][3]["arch"] == f"{arch}/mean"
    assert any(n.startswith("MLSAE and crosscoder: one row per layer") for n in report["notes"])


def test_a_budget_too_small_to_rank_methods_is_said(world):
    from routesae.evaluate.run import EvalConfig, run_eval

    report = run_eval(EvalConfig(saes=[str(world / "runs" / "topk-k8")], cache=str(world / "s.zarr"), progress=False))
    steps = json.loads((world / "runs" / "topk-k8" / "config.json").read_text())["training"]["steps"]
    assert any(f"(the fewest: {steps:,}): far too few to rank methods" in n for n in report.notes), report.notes
