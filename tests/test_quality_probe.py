"""Sparse probing (`routesae probe-data`, `routesae probe`): known answers on a labelled store
written here by hand from cache_schema.md, the benchmark's label and split rules, one-line errors,
and the whole path on a tiny random Llama."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from routesae.cli import _OneLineErrors
from routesae.errors import RouteSAEError
from routesae.quality.probe import fit_probe, rank_latents, run_probe, ProbeConfig
from routesae.quality.probe_cli import probe, probe_data
from routesae.quality.probe_data import binarize, load_dataset, split
from routesae.quality.probe_store import ATTR_KEY, LabelledStore, context_ids, read_position
from routesae.train.config import SAEConfig
from routesae.train.saes import build_sae

MODEL = {"id": "synthetic", "revision": "r1", "dtype": "float32", "compute_dtype": "float32", "n_layers": 4,
         "d_model": 16}
D, N_LATENTS, K, SIGNAL = 16, 32, 4, 5


def _cli():
    """The two commands behind routesae's own error handling (one line, exit 1)."""
    group = _OneLineErrors("routesae")
    group.add_command(probe_data)
    group.add_command(probe)
    return group


def _one_line_error(result, match: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and match in lines[0], result.stderr


def write_labelled_store(path, datasets: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], layers=(2, 3)):
    """A labelled store as cache_schema.md "Labelled stores" lays it out, written with plain zarr.
    datasets: (name, acts [n, D] (every layer gets them), labels [n], split [n] 0/1)."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    acts = np.concatenate([a for _, a, _, _ in datasets]).astype(np.float32)
    for layer in layers:
        group.create_array(f"acts/{layer}", shape=acts.shape, dtype=np.float32)[:] = acts
    group.create_array("labels", shape=(len(acts),), dtype=np.int8)[:] = np.concatenate([y for _, _, y, _ in datasets])
    group.create_array("split", shape=(len(acts),), dtype=np.int8)[:] = np.concatenate([s for *_, s in datasets])
    group.create_array("dataset", shape=(len(acts),), dtype=np.int16)[:] = np.concatenate(
        [np.full(len(y), i) for i, (_, _, y, _) in enumerate(datasets)])
    group.create_array("position", shape=(len(acts),), dtype=np.int32)[:] = np.ones(len(acts))
    group.create_array("length", shape=(len(acts),), dtype=np.int32)[:] = np.full(len(acts), 2)
    records, at = [], 0
    for name, _, y, s in datasets:
        records.append({"name": name, "source": "test", "classes": ["0", "1"], "one_vs_rest": False,
                        "n_rows": len(y), "train": int((s == 0).sum()), "test": int((s == 1).sum()), "start": at,
                        "truncated": 0})
        at += len(y)
    group.attrs[ATTR_KEY] = {"schema_version": 1, "model": MODEL, "layers": list(layers), "d_model": D,
                             "storage_dtype": "float32", "max_len": 8, "seed": 0, "n_prompts": len(acts),
                             "datasets": records}
    return path


def save_sae(folder, arch: str, layers: list[int], model: dict, d: int = D, weights=None, seed: int = 0):
    cfg = SAEConfig(arch=arch, d_model=d, n_latents=N_LATENTS, k=K, layers=layers, normalization="none", model=model)
    sae = build_sae(cfg, torch.Generator().manual_seed(seed))
    tensors = sae.export_tensors()
    if weights:
        tensors.update(weights)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae.safetensors"))
    (folder / "config.json").write_text(json.dumps({**cfg.to_dict(), "training": {}}))
    return folder


def one_latent_sae(folder, latent: int, layer: int = 3):
    """A TopK SAE whose `latent` reads coordinate 0 alone (gain 1) and whose other latents never read
    it: on inputs with coordinate 0 at +SIGNAL or -SIGNAL, `latent` fires exactly where it is +SIGNAL."""
    g = torch.Generator().manual_seed(1)
    w_enc = 0.1 * torch.randn(D, N_LATENTS, generator=g)
    w_enc[0] = 0.0
    w_enc[:, latent] = 0.0
    w_enc[0, latent] = 1.0
    return save_sae(folder, "topk", [layer], MODEL, weights={"W_enc": w_enc, "b_enc": torch.zeros(N_LATENTS),
                                                               "b_dec": torch.zeros(D)})


def _synthetic(n: int, seed: int, label_from_signal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n rows, half train half test, balanced; coordinate 0 is +-SIGNAL: the label itself, or an
    independent coin."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2).astype(np.int8)
    x = rng.standard_normal((n, D))
    coin = y if label_from_signal else rng.permutation(y)
    x[:, 0] = np.where(coin == 1, SIGNAL, -SIGNAL)
    split_ = np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(np.int8)
    return x, y, split_


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    n = 800
    x1, y1, s1 = _synthetic(n, 0, True)
    x2, y2, s2 = _synthetic(n, 1, False)
    write_labelled_store(root / "store.zarr", [("signal", x1, y1, s1), ("noise", x2, y2, s2)])
    one_latent_sae(root / "sae", latent=7)
    return root


def test_a_label_that_is_one_latent_gives_auc_1_at_k_1(synthetic, tmp_path):
    # the SAE's latent 7 fires on every positive prompt of "signal" and on no negative one
    from routesae.train.load import load_sae

    sae = load_sae(synthetic / "sae")
    store = LabelledStore.open(synthetic / "store.zarr")
    rows = np.flatnonzero(store.dataset == 0)
    z = sae.encode(store.acts(3, rows)).numpy()
    assert ((z[:, 7] > 0) == (store.labels[rows] == 1)).all()  # the construction holds
    result, _ = run_probe(ProbeConfig(store=str(synthetic / "store.zarr"), saes=[str(synthetic / "sae")],
                                      out=str(tmp_path), ks=[1, 4], progress=False))
    row = next(r for r in result["rows"] if r["dataset"] == "signal" and r["method"] == "sae" and r["k"] == 1)
    assert row["latents"] == [7]
    assert row["auc"] == 1.0 and row["acc"] == 1.0
    # the dense probe sees coordinate 0 as well
    dense = next(r for r in result["rows"] if r["dataset"] == "signal" and r["method"] == "dense")
    assert dense["auc"] == 1.0


def test_a_label_independent_of_the_codes_gives_about_half(synthetic, tmp_path):
    result, _ = run_probe(ProbeConfig(store=str(synthetic / "store.zarr"), saes=[str(synthetic / "sae")],
                                      out=str(tmp_path), ks=[1, 4, 16], progress=False))
    n1 = n0 = 200  # test prompts per class
    # the AUC's standard deviation under no signal (Mann-Whitney): sqrt((n1 + n0 + 1) / (12 n1 n0))
    tolerance = 4 * math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))
    rows = [r for r in result["rows"] if r["dataset"] == "noise"]
    assert len(rows) == 1 + 3 * 2  # dense, then sae and random at each k
    for r in rows:
        assert abs(r["auc"] - 0.5) < tolerance, r


def test_latents_are_ranked_by_the_normalized_class_mean_difference():
    y = np.array([1, 1, 0, 0])
    z = np.array([
        # A: large values, fires on one positive: normalized 1 there, diff |0.5 - 0| = 0.5
        # B: small values on every positive: diff 1; C: fires on both classes alike: diff 0
        # D: never fires: never picked; E: on the negatives, normalized values 1.5 and 0.5: diff 1
        [100.0, 1.0, 2.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 2.0, 0.0, 3.0],
        [0.0, 0.0, 0.0, 0.0, 1.0],
    ])
    assert rank_latents(z, y).tolist() == [1, 4, 0, 2]  # B and E tie at 1: lower index first


def test_fit_probe_on_separable_and_constant_features():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 100)
    x = (y + 0.1 * rng.standard_normal(200))[:, None]
    assert fit_probe(x[:150], y[:150], x[150:], y[150:]).auc == 1.0
    empty = fit_probe(x[:150, :0], y[:150], x[150:, :0], y[150:])
    assert (empty.auc, empty.acc) == (0.5, 0.5)


def test_targets_become_0_1_as_sorted_labels():
    labels, classes, ovr = binarize(["male", "female", "male"], "x")
    assert labels.tolist() == [1, 0, 1] and classes == ("female", "male") and not ovr
    labels, classes, _ = binarize(["True", "False"], "x")
    assert labels.tolist() == [1, 0] and classes == ("False", "True")
    labels, classes, _ = binarize(["10", "9", "10"], "x")  # numbers sort as numbers
    assert labels.tolist() == [1, 0, 1] and classes == ("9", "10")
    labels, classes, ovr = binarize(["b", "a", "c", "b", "a", "b"], "x")  # one-vs-rest of the most frequent
    assert labels.tolist() == [1, 0, 0, 1, 0, 1] and classes == ("rest", "b") and ovr
    with pytest.raises(RouteSAEError, match="one class"):
        binarize(["x", "x"], "f.csv")


def test_splits_are_balanced_disjoint_seeded_and_the_benchmarks_size():
    labels = np.tile([0, 1], 2500).astype(np.int8)
    sp = split(labels, "d")
    assert len(sp.train) == 1024 and len(sp.test) == 5000 - 1024
    assert labels[sp.train].sum() == 512 and labels[sp.test].sum() == len(sp.test) // 2
    assert not set(sp.train) & set(sp.test)
    again = split(labels, "d")
    assert (again.train == sp.train).all() and (again.test == sp.test).all()
    assert not (split(labels, "other").train == sp.train).all()  # seeded by the dataset's name too
    small = np.tile([0, 1], 400).astype(np.int8)  # N = 800: train N - 100
    assert len(split(small, "s").train) == 700
    capped = split(labels, "d", max_train=100, max_test=50)
    assert (len(capped.train), len(capped.test)) == (100, 50)
    tiny = np.tile([0, 1], 20).astype(np.int8)  # N = 40 < 200: N // 2 kept for test
    sp = split(tiny, "t")
    assert (len(sp.train), len(sp.test)) == (20, 20)


def test_contexts_keep_bos_and_cut_from_the_left():
    assert context_ids([5, 6, 7], 1, 8) == [1, 5, 6, 7]
    assert context_ids([5, 6, 7, 8, 9], 1, 4) == [1, 7, 8, 9]
    assert read_position([1, 5, 6, 2], frozenset({1, 2})) == 2  # a trailing special id is skipped
    assert read_position([1], frozenset({1})) == 0


def test_sae_probes_files_and_user_files_read_alike(tmp_path):
    pytest.importorskip("numcodecs")
    try:
        data = load_dataset("hist_fig_ismale")
    except RouteSAEError as e:
        pytest.skip(str(e))
    assert data.name == "5_hist_fig_ismale" and len(data.prompts) == 5000
    assert data.labels.sum() == 2500  # exactly half, as the benchmark's files are
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "target": i % 2}) for i in range(6)))
    assert load_dataset(str(tmp_path / "d.jsonl")).labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_bad_input_is_one_line(synthetic, tmp_path):
    (tmp_path / "cols.csv").write_text("text,label\nhello,1\nbye,0\n")
    (tmp_path / "one.csv").write_text("prompt,target\nhello,1\nbye,1\n")
    for name, match in [("cols.csv", "has no 'prompt' or 'target' column"), ("one.csv", "has one class")]:
        result = CliRunner().invoke(_cli(), ["probe-data", "--dataset", str(tmp_path / name), "--model", "unused",
                                             "--out", str(tmp_path / "s.zarr")])
        _one_line_error(result, match)
        assert not (tmp_path / "s.zarr").exists()
    deep = one_latent_sae(tmp_path / "deep", latent=0, layer=1)  # the store holds layers 2 and 3
    result = CliRunner().invoke(_cli(), ["probe", "--store", str(synthetic / "store.zarr"), "--sae", str(deep),
                                         "--out", str(tmp_path / "o")])
    _one_line_error(result, "the store has no layer [1]")
    result = CliRunner().invoke(_cli(), ["probe", "--store", str(tmp_path / "nothing"), "--sae", str(deep),
                                         "--out", str(tmp_path / "o")])
    _one_line_error(result, "no labelled store")


# --- the whole path on a tiny random Llama --------------------------------------------------------

def _write_sets(root):
    words = ["apple", "river", "stone", "cloud", "tiger", "glass", "paper", "light", "chair", "grass"]
    a = [{"prompt": f"The {w} is {'red' if i % 2 else 'blue'} today", "target": "red" if i % 2 else "blue"}
         for i, w in enumerate(words * 3)]
    (root / "colors.jsonl").write_text("\n".join(json.dumps(r) for r in a))
    rows = ["prompt,target"] + [f"\"{w} number {i}, said the file\",{'yes' if i % 3 == 0 else 'no'}"
                                for i, w in enumerate(words * 4)]
    (root / "yesno.csv").write_text("\n".join(rows) + "\n")


def test_probe_data_then_probe_on_a_tiny_model(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _write_sets(tmp_path)
    store_path = tmp_path / "probes.zarr"
    result = CliRunner().invoke(_cli(), [
        "probe-data", "--dataset", f"{tmp_path / 'colors.jsonl'},{tmp_path / 'yesno.csv'}", "--model",
        str(tiny_llama_dir), "--layers", "1-3", "--max-len", "6", "--batch-size", "5", "--dtype", "float32",
        "--device", "cpu", "--out", str(store_path), "--quiet"])
    assert result.exit_code == 0, result.stderr
    store = LabelledStore.open(store_path)
    assert [d["name"] for d in store.datasets] == ["colors", "yesno"] and store.layers == [1, 2, 3]
    # every stored residual is the last token's of a plain forward of BOS + the prompt's last 5 tokens
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    colors = [json.loads(line) for line in (tmp_path / "colors.jsonl").read_text().splitlines()]
    index = {r["prompt"]: i for i, r in enumerate(colors)}
    sp = split(load_dataset(str(tmp_path / "colors.jsonl")).labels, "colors", 42)
    rows = np.flatnonzero(store.dataset == 0)
    assert len(rows) == len(sp.train) + len(sp.test) == 30
    for j, row in enumerate(rows[:6]):
        prompt = colors[np.r_[sp.train, sp.test][j]]["prompt"]
        ids = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"][-5:]]
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in (1, 3):
            got = store.acts(layer, np.array([row]))[0]
            torch.testing.assert_close(got, hs[layer][0, -1], rtol=1e-4, atol=1e-5)
        assert store.labels[row] == (colors[index[prompt]]["target"] == "red")
    assert (store.split[rows] == np.r_[np.zeros(len(sp.train)), np.ones(len(sp.test))]).all()

    saes = tmp_path / "saes"
    for arch, layers in [("topk", [2]), ("routesae", [1, 2, 3]), ("mlsae", [1, 2, 3]), ("crosscoder", [1, 2, 3])]:
        cfg = SAEConfig(arch=arch, d_model=64, n_latents=N_LATENTS, k=K, layers=layers, model=store.model)
        sae = build_sae(cfg, torch.Generator().manual_seed(0))
        (saes / arch).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sae.export_tensors().items()}, str(saes / arch / "sae.safetensors"))
        (saes / arch / "config.json").write_text(json.dumps({**cfg.to_dict(), "training": {}}))
    result = CliRunner().invoke(_cli(), ["probe", "--store", str(store_path), "--sae", str(saes), "--k", "1,2",
                                         "--device", "cpu", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["crosscoder", "mlsae", "routesae", "topk"]
    assert all("probing AUC k=1" in line and "over 2 datasets" in line for line in lines)
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    mlsae = [r for r in report["rows"] if r["sae"] == "mlsae" and r["method"] == "sae"]
    assert sorted({r["layer"] for r in mlsae}) == [1, 2, 3] and len(mlsae) == 2 * 3 * 2
    dense = [r for r in report["rows"] if r["method"] == "dense"]
    want = [(d, layer) for d in ("colors", "yesno") for layer in (1, 2, 3)]
    assert sorted((r["dataset"], r["layer"]) for r in dense) == want
    for r in report["rows"]:
        assert r["auc"] is None or 0.0 <= r["auc"] <= 1.0
    assert "| topk |" in (tmp_path / "out" / "probe.md").read_text()


def test_the_commands_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys; import routesae.quality.probe_cli; "
            "print([m for m in ('torch', 'transformers', 'zarr', 'scipy', 'sklearn', 'numcodecs') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr
