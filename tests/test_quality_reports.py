"""The quality figures in the reports (quality/results.py, eval --quality, dashboard --quality): the real
probe, absorption and synth-score commands run on a tiny Llama's SAEs and a tiny synthetic store, then
eval's Quality table checked against figures recomputed here from their JSON, the dashboard page of a
latent picked for a dataset, and one-line errors and warnings for bad --quality paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from routesae.cli import main
from routesae.evaluate.report import quality_markdown
from routesae.quality.results import load_quality, table_row
from tiny_models import tiny_store_with_saes


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, result.output + str(result.exception or "")
    return result


def _one_line_error(result, match: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and match in lines[0], result.output


def _write_sets(root: Path) -> tuple[Path, Path]:
    """Two labelled sets whose labels only partly follow the prompts (a colour pair with one label in
    seven flipped; the parity of a number), so the probes' AUCs fall between 0.5 and 1 and differ by k."""
    words = ["apple", "river", "stone", "cloud", "tiger", "glass", "paper", "light", "chair", "grass"]
    colours = ["red", "blue", "green", "black"]
    a = []
    for i, (c, w) in enumerate((c, w) for c in colours for w in words * 2):
        warm = c in ("red", "green")
        a.append({"prompt": f"a {c} {w} here", "target": "warm" if warm != (i % 7 == 3) else "cold"})
    (root / "shade.jsonl").write_text("\n".join(json.dumps(r) for r in a))
    rows = ["prompt,target"] + [f"\"the {w} number {i} is {'odd' if i % 2 else 'even'}\",{'yes' if i % 3 == 0 else 'no'}"
                                for i, w in enumerate(words * 6)]
    (root / "thirds.csv").write_text("\n".join(rows) + "\n")
    return root / "shade.jsonl", root / "thirds.csv"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama, its store and a TopK (layer 3), a RouteSAE and a crosscoder (1..3) fitted on it; probe
    (k 1,4,16 on two datasets), absorption and contexts outputs of those SAEs, all from the real commands."""
    root = tmp_path_factory.mktemp("quality-reports")
    model = tiny_store_with_saes(root, ["topk", "routesae", "crosscoder"])
    shade, thirds = _write_sets(root)
    _ok(_run("probe-data", "--dataset", f"{shade},{thirds}", "--model", model, "--layers", "1-3", "--max-len", "8",
             "--batch-size", "8", "--dtype", "float32", "--device", "cpu", "--out", root / "probes.zarr", "--quiet"))
    _ok(_run("probe", "--store", root / "probes.zarr", "--sae", root / "runs", "--k", "1,4,16", "--device", "cpu",
             "--out", root / "probe", "--quiet"))
    _ok(_run("absorption", "--sae", root / "runs", "--out", root / "abs", "--min-probe-f1", "0", "--device", "cpu",
             "--quiet"))
    _ok(_run("contexts", "--sae", root / "runs" / "topk-k8", "--cache", root / "s.zarr", "--out", root / "ctx",
             "--quiet"))
    return root


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A one-layer synthetic store, a TopK SAE of random decoder rows tied to it, and its synth-score output."""
    import torch

    from routesae.atomic_files import write_json
    from routesae.store.zarr_store import Cache
    from routesae.train.checkpoint import write_safetensors
    from routesae.train.config import SAEConfig
    from routesae.train.saes import build_sae

    root = tmp_path_factory.mktemp("quality-synth")
    _ok(_run("synth", "--out", root / "s.zarr", "--tokens", "4096", "--d-model", "16"))
    cache = Cache.open(root / "s.zarr")
    cfg = SAEConfig(arch="topk", d_model=16, n_latents=64, k=4, layers=[0], normalization="none",
                    cache_fingerprint=cache.fingerprint, model=cache.model)
    sae = build_sae(cfg, torch.Generator().manual_seed(3))
    (root / "synth-topk").mkdir()
    write_safetensors(root / "synth-topk" / "sae.safetensors", sae.export_tensors())
    write_json(root / "synth-topk" / "config.json", {**cfg.to_dict(), "training": {}})
    _ok(_run("synth-score", root / "synth-topk", "--cache", root / "s.zarr", "--all-tokens", "--out", root / "scores"))
    return root


def _probe_by_hand(probe: dict, name: str, k: int) -> tuple[float, float, float]:
    """(SAE AUC, random AUC, dense AUC) at k, means over datasets, from probe.json's rows: one row per
    dataset for these codes; the dense baseline at the SAE's layers, the best by validation AUC."""
    sae = next(s for s in probe["saes"] if s["name"] == name)
    got = {"sae": [], "random": [], "dense": []}
    for d in probe["datasets"]:
        for method in ("sae", "random"):
            (row,) = [r for r in probe["rows"] if r["sae"] == name and r["dataset"] == d and r["method"] == method
                      and r["k"] == k]
            got[method].append(row["auc"])
        dense = [r for r in probe["rows"] if r["method"] == "dense" and r["dataset"] == d and r["layer"] in sae["layers"]]
        got["dense"].append(max(dense, key=lambda r: -1 if r["val_auc"] is None else r["val_auc"])["auc"])
    return tuple(float(np.mean(got[m])) for m in ("sae", "random", "dense"))


def _absorption_by_hand(data: dict, name: str) -> tuple[float, float]:
    s = next(s for s in data["saes"] if s["name"] == name)
    sites = [(np.mean([r["absorption"] for r in site["letters"]]), np.mean([r["full_absorption"] for r in site["letters"]]))
             for site in s["sites"]]
    return float(np.mean([a for a, _ in sites])), float(np.mean([f for _, f in sites]))


def test_eval_quality_table_equals_the_outputs(world, tmp_path):
    r = _ok(_run("eval", "--sae", world / "runs", "--cache", world / "s.zarr", "--quality", world / "probe",
                 "--quality", world / "abs" / "absorption.json", "--out", tmp_path / "rep", "--quiet"))
    assert "routesae: warning" not in r.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    probe = json.loads((world / "probe" / "probe.json").read_text())
    absorption = json.loads((world / "abs" / "absorption.json").read_text())
    rows = {q["name"]: q for q in report["quality"]}
    # the SAEs' own rows only: not the RouteSAE's random-routing baselines nor the crosscoder's single layers
    assert sorted(rows) == ["crosscoder-k8 (mean of 3 layers)", "routesae-k8", "topk-k8"]
    assert {t["name"] for t in report["table"]} > set(rows)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "\nQuality\n\n| SAE | probe AUC k1 | probe AUC k16 | dense AUC | absorption | full absorption | MCC | recovered |" in md
    for row_name, q in rows.items():
        name = row_name.split(" ")[0]
        auc1, rand1, dense = _probe_by_hand(probe, name, 1)
        auc16, rand16, _ = _probe_by_hand(probe, name, 16)
        ab, full = _absorption_by_hand(absorption, name)
        assert (q["probe_k1"], q["probe_k16"]) == (1, 16)
        for key, want in [("probe_auc_k1", auc1), ("probe_auc_k16", auc16), ("random_auc_k1", rand1),
                          ("random_auc_k16", rand16), ("dense_auc", dense)]:
            assert q[key] == pytest.approx(want, abs=2e-6), key
        assert q["absorption"] == pytest.approx(ab, abs=1e-12) and q["full_absorption"] == pytest.approx(full, abs=1e-12)
        assert q["mcc"] is None and q["recovered"] is None
        assert q["absorption_letters"] and q["sae"] == str((world / "runs" / name).resolve())
        assert (f"| {row_name} | {auc1:.3f} | {auc16:.3f} | {dense:.3f} | {ab:.3f} | {full:.3f} | - | - |") in md
    notes = "\n".join(report["notes"])
    assert "probe AUC k1 / k16" in notes and str(world / "probe" / "probe.json") in notes
    assert "absorption is weak evidence" in notes and "are left out. On a model that spells poorly" in notes


def test_the_nearest_k_is_shown_and_said(world, tmp_path):
    # a probe.json without k=16 (as if probed at 1 and 4): the k16 column shows k=4 and says so
    data = json.loads((world / "probe" / "probe.json").read_text())
    data["ks"] = [1, 4]
    data["rows"] = [r for r in data["rows"] if r["k"] != 16]
    for s in data["saes"]:
        for method in ("sae", "random"):
            del s["summary"][method]["16"]
    (tmp_path / "probe.json").write_text(json.dumps(data))
    results = load_quality([str(tmp_path / "probe.json")])
    topk = results.figures(str(world / "runs" / "topk-k8"), "topk-k8")
    assert (topk.probe.k_low, topk.probe.k_high) == (1, 4)
    want = next(s for s in data["saes"] if s["name"] == "topk-k8")["summary"]["sae"]["4"]
    assert topk.probe.auc_high == want
    row = table_row("topk-k8", topk)
    assert f"| topk-k8 | {row['probe_auc_k1']:.3f} | {want:.3f} (k=4) | " in quality_markdown([row])


def test_synth_figures_reach_the_table_by_name(synth, tmp_path):
    r = _ok(_run("eval", "--sae", synth / "synth-topk", "--cache", synth / "s.zarr", "--all-tokens",
                 "--quality", synth / "scores", "--json", tmp_path / "r.json", "--quiet"))
    saved = json.loads((synth / "scores" / "synth_score.json").read_text())["saes"][0]
    (q,) = json.loads((tmp_path / "r.json").read_text())["quality"]
    assert q["name"] == "synth-topk" and q["mcc"] == saved["mcc"] and q["recovered"] == saved["recovered"]
    assert q["probe_auc_k1"] is None and q["absorption"] is None
    assert f"| synth-topk | - | - | - | - | - | {saved['mcc']:.3f} | {saved['recovered']:.3f} |" in r.output
    assert "Quality, MCC / recovered" in r.output


def test_absorption_partners_follow_the_letters(world):
    data = json.loads((world / "abs" / "absorption.json").read_text())
    results = load_quality([str(world / "abs")])
    for s in data["saes"]:
        facts = results.latents_of(s["path"], s["name"])
        n_roles = 0
        for site in s["sites"]:
            for r in site["letters"]:
                for i in r["main_latents"]:
                    assert any(p.letter == r["letter"] and p.role == "main" and p.partners == r["absorbing_latents"]
                               for p in facts[i].partners)
                for i in r["absorbing_latents"]:
                    assert any(p.letter == r["letter"] and p.role == "absorbing" and p.partners == r["main_latents"]
                               for p in facts[i].partners)
                n_roles += len(r["main_latents"]) + len(r["absorbing_latents"])
        assert n_roles > 0 and sum(len(f.partners) for f in facts.values()) == n_roles


def test_dashboard_lists_the_datasets_a_latent_serves(world, tmp_path):
    ctx = world / "ctx" / "topk-k8" if (world / "ctx" / "topk-k8").is_dir() else world / "ctx"
    r = _ok(_run("dashboard", "--contexts", ctx, "--out", tmp_path / "dash", "--no-unembed", "--quality", world / "probe",
                 "--quality", world / "abs", "--quiet"))
    assert "routesae: warning" not in r.output
    probe = json.loads((world / "probe" / "probe.json").read_text())
    picked = {}
    for row in probe["rows"]:
        if row["sae"] == "topk-k8" and row["method"] == "sae" and row["k"] == 1:
            picked.setdefault(row["latents"][0], []).append((row["dataset"], row["auc"]))
    for latent, served in picked.items():
        page = (tmp_path / "dash" / "latents" / f"{latent}.html").read_text()
        assert "<h2>Probing</h2>" in page
        for dataset, auc in served:
            assert f'<td class="l">{dataset}</td><td>1</td><td>{auc:.3g}</td>' in page
    others = [i for i in range(64) if i not in picked]
    assert "Not among the k=1 latents picked for any of the 2 datasets probed." in \
        (tmp_path / "dash" / "latents" / f"{others[0]}.html").read_text()
    # absorption partners: a main latent's page names its letter and links the latents that absorbed it
    data = json.loads((world / "abs" / "absorption.json").read_text())
    letter = next(r for s in data["saes"] if s["name"] == "topk-k8" for r in s["sites"][0]["letters"]
                  if r["absorbing_latents"])
    page = (tmp_path / "dash" / "latents" / f"{letter['main_latents'][0]}.html").read_text()
    assert "<h2>Absorption partners</h2>" in page and f'<td class="l">{letter["letter"]}</td>' in page
    for j in letter["absorbing_latents"]:
        assert f'<a href="{j}.html">{j}</a>' in page
    index = (tmp_path / "dash" / "index.html").read_text()
    assert '<th data-k="probing" data-d="desc">Probing</th>' in index
    latent, served = next(iter(picked.items()))
    row = next(line for line in index.splitlines() if f'<a href="latents/{latent}.html">' in line)
    assert all(dataset in row for dataset, _ in served)
    assert "cdn" not in index.lower() and "<script src" not in index and "<link" not in index


def test_bad_quality_paths(world, synth, tmp_path):
    # checked before any work: the store named does not even exist
    missing = tmp_path / "no-store.zarr"
    _one_line_error(_run("eval", "--sae", world / "runs", "--cache", missing, "--quality", tmp_path / "nothing"),
                    f"no quality output at {tmp_path / 'nothing'}")
    (tmp_path / "other.json").write_text(json.dumps({"saes": [], "hello": 1}))
    _one_line_error(_run("eval", "--sae", world / "runs", "--cache", missing, "--quality", tmp_path / "other.json"),
                    "other.json is not a quality output")
    (tmp_path / "empty").mkdir()
    _one_line_error(_run("eval", "--sae", world / "runs", "--cache", missing, "--quality", tmp_path / "empty"),
                    "holds no probe.json, absorption.json, synth_score.json")
    _one_line_error(_run("dashboard", "--contexts", world / "ctx", "--out", tmp_path / "dash", "--no-unembed",
                         "--quality", tmp_path / "other.json"), "other.json is not a quality output")
    assert not (tmp_path / "dash").exists()
    # outputs of other SAEs: one warning line, no table
    r = _ok(_run("eval", "--sae", synth / "synth-topk", "--cache", synth / "s.zarr", "--all-tokens",
                 "--quality", world / "probe", "--json", tmp_path / "r.json", "--quiet"))
    warnings = [line for line in r.output.splitlines() if line.startswith("routesae: warning")]
    assert warnings == [f"routesae: warning: --quality {world / 'probe'}: none of its SAEs (crosscoder-k8, "
                        "routesae-k8, topk-k8) is among those evaluated"]
    assert json.loads((tmp_path / "r.json").read_text())["quality"] == [] and "\nQuality\n" not in r.output


def test_a_moved_output_matches_by_name(world, tmp_path):
    # probe.json written from another working directory: its recorded relative paths name no folder here
    data = json.loads((world / "probe" / "probe.json").read_text())
    for s in data["saes"]:
        s["path"] = f"elsewhere/{s['name']}"
    (tmp_path / "probe.json").write_text(json.dumps(data))
    results = load_quality([str(tmp_path / "probe.json")])
    assert results.figures(str(world / "runs" / "topk-k8"), "topk-k8").probe is not None
    # while a recorded folder that exists and is another SAE's is not taken for this one by its name
    shutil.copytree(world / "runs" / "topk-k8", tmp_path / "copy" / "topk-k8")
    assert load_quality([str(world / "probe")]).figures(str(tmp_path / "copy" / "topk-k8"), "topk-k8") is None


def test_help_names_the_option_and_the_reader_imports_nothing_heavy():
    for command in ("eval", "dashboard"):
        assert "--quality PATH" in _run(command, "--help").output
    code = ("import sys, routesae.quality.results\n"
            "print([m for m in ('torch', 'zarr', 'scipy', 'sklearn', 'numpy') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr
