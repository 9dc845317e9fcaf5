"""`routesae fit` on bad input: one line, non-zero exit, no traceback, nothing saved lost."""

from __future__ import annotations

import hashlib

import pytest
import torch
from click.testing import CliRunner

from routesae.cli import main
from synthetic_store import make_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_store(root / "a.zarr", 1024, layers=list(range(9)), chunk_contexts=4)
    make_store(root / "other.zarr", 1024, layers=list(range(9)), chunk_contexts=4, model_id="another-model")
    make_store(root / "unfinished.zarr", 1024, layers=list(range(9)), chunk_contexts=4, finish=False)
    return root


def fit(*args: str):
    return CliRunner().invoke(main, ["fit", *args, "--no-progress"])


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routesae: error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_missing_and_unfinished_cache(stores, tmp_path):
    one_line_error(fit("--cache", str(stores / "nope.zarr"), "--out", str(tmp_path / "r")), "no store at")
    one_line_error(fit("--cache", str(stores / "unfinished.zarr"), "--out", str(tmp_path / "r")), "unfinished harvest")
    assert not (tmp_path / "r").exists()


def test_layer_not_in_cache_and_k_too_large(stores, tmp_path):
    a = str(stores / "a.zarr")
    one_line_error(fit("--cache", a, "--out", str(tmp_path / "r"), "--arch", "topk", "--layer", "40"), "layer 40 is not in the store")
    one_line_error(fit("--cache", a, "--out", str(tmp_path / "r"), "--k", "8,200", "--latents", "100"), "k=200", "latent count 100")
    one_line_error(fit("--cache", a, "--out", str(tmp_path / "r"), "--arch", "routesae", "--routed-layers", "3-12"), "routed layers 9-12")
    one_line_error(fit("--cache", a, "--out", str(tmp_path / "r"), "--arch", "mlp"), "unknown architecture 'mlp'")
    one_line_error(fit("--cache", a, "--out", str(tmp_path / "r"), "--tokens", "1k", "--epochs", "2"), "not both")
    one_line_error(fit("--cache", a, "--out", str(tmp_path / "r"), "--tokens", "lots"), "--tokens")
    one_line_error(fit("--cache", a, "--out", str(tmp_path / "r"), "--eval-tokens", "1000"), "nothing to train on")
    assert not (tmp_path / "r").exists()


def test_resume_against_another_models_cache_loses_nothing(stores, tmp_path):
    out = tmp_path / "r"
    args = ["--out", str(out), "--arch", "topk", "--k", "4", "--latents", "32", "--batch-size", "64", "--log-every", "2"]
    ok = fit("--cache", str(stores / "a.zarr"), *args, "--tokens", "600")
    assert ok.exit_code == 0, ok.output
    before = digest(out)
    assert "sae.safetensors" in before and "config.json" in before
    one_line_error(fit("--cache", str(stores / "other.zarr"), *args, "--tokens", "600"), "another-model", "another cache")
    one_line_error(fit("--cache", str(stores / "a.zarr"), *args, "--tokens", "900"), "other settings", "tokens: 600 -> 900")
    assert digest(out) == before
    again = fit("--cache", str(stores / "a.zarr"), *args, "--tokens", "600")
    assert again.exit_code == 0 and "already holds this finished fit" in again.output
    assert digest(out) == before


def test_overwrite_replaces_a_fit_of_another_store_and_keeps_the_same_one(stores, tmp_path):
    out = tmp_path / "r"
    args = ["--arch", "topk", "--k", "4,8", "--latents", "32", "--batch-size", "64", "--tokens", "600"]
    assert fit("--cache", str(stores / "a.zarr"), "--out", str(out), *args).exit_code == 0
    (out / "notes.txt").write_text("keep me")
    first = digest(out)
    one_line_error(fit("--cache", str(stores / "other.zarr"), "--out", str(out), *args), "--overwrite to replace it")
    assert digest(out) == first

    replaced = fit("--cache", str(stores / "other.zarr"), "--out", str(out), *args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert (out / "notes.txt").read_text() == "keep me"  # only the fit's own files went
    # the same as a fit into an empty folder
    fresh = tmp_path / "fresh"
    assert fit("--cache", str(stores / "other.zarr"), "--out", str(fresh), *args).exit_code == 0
    from safetensors.torch import load_file

    for name in ("topk-k4", "topk-k8"):
        got, want = load_file(out / name / "sae.safetensors"), load_file(fresh / name / "sae.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert digest(out)[f"{name}/sae.safetensors"] != first[f"{name}/sae.safetensors"]
    # the same fit again is kept, not retrained
    after = digest(out)
    again = fit("--cache", str(stores / "other.zarr"), "--out", str(out), *args, "--overwrite")
    assert again.exit_code == 0 and "already holds this finished fit" in again.output
    assert digest(out) == after


def test_out_folder_of_something_else_is_refused(stores, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    one_line_error(fit("--cache", str(stores / "a.zarr"), "--out", str(out)), "holds no routesae fit")
    assert (out / "notes.txt").read_text() == "keep me"


def test_load_sae_errors(tmp_path):
    from routesae.errors import RouteSAEError
    from routesae.train.load import load_sae

    with pytest.raises(RouteSAEError, match="no SAE folder"):
        load_sae(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(RouteSAEError, match="no finished SAE"):
        load_sae(tmp_path / "half")
