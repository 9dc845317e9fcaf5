"""Bad input to `routesae harvest`: one line, non-zero exit, no traceback, nothing committed lost."""

from __future__ import annotations

import subprocess

import pytest
from click.testing import CliRunner

from routesae import Cache
from routesae.cli import main


def harvest(args: list[str], env: dict | None = None):
    result = CliRunner().invoke(main, ["harvest", "--quiet", "--context-len", "32", "--batch-size", "4", *args],
                                env=env)
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    text = result.output.strip()
    assert result.exit_code != 0, text
    assert "Traceback" not in text and result.exception is None or isinstance(result.exception, SystemExit), text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("routesae: error:"), text
    for f in fragments:
        assert f in text, text


@pytest.fixture()
def tiny(tiny_llama_dir) -> list[str]:
    return ["--model", str(tiny_llama_dir), "--tokens", "256"]


def test_missing_dataset(tiny, tmp_path):
    assert_one_line_error(harvest([*tiny, "--dataset", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "s")]),
                          "no such dataset")


def test_empty_dataset(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "s"
    assert_one_line_error(harvest([*tiny, "--dataset", str(empty), "--out", str(out)]), "no text")
    assert not out.exists()


def test_dataset_missing_field(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "some words"}\n')
    assert_one_line_error(harvest([*tiny, "--dataset", str(data), "--out", str(tmp_path / "s")]), "--text-field")


def test_layer_out_of_range(tiny, tmp_path):
    assert_one_line_error(harvest([*tiny, "--dataset", "builtin", "--layers", "2-9", "--out", str(tmp_path / "s")]),
                          "out of range")


def test_context_longer_than_model_allows(tiny_llama_dir, tmp_path):
    r = harvest(["--model", str(tiny_llama_dir), "--dataset", "builtin", "--tokens", "4096", "--context-len", "1024",
                 "--out", str(tmp_path / "s")])
    assert_one_line_error(r, "exceeds")


def test_unknown_model_folder(tmp_path):
    assert_one_line_error(harvest(["--model", str(tmp_path / "nomodel"), "--dataset", "builtin", "--out", str(tmp_path / "s")]),
                          "not a model folder")


def test_unreachable_hub_model_and_dataset(tiny, tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    r = harvest(["--model", "someorg/some-model", "--dataset", "builtin", "--out", str(tmp_path / "s")], env=env)
    assert_one_line_error(r, "unreachable", "smollm2")
    r = harvest([*tiny, "--dataset", "someorg/some-dataset", "--out", str(tmp_path / "s")], env=env)
    assert_one_line_error(r, "unreachable", "builtin")


def test_output_under_a_file(tiny, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(harvest([*tiny, "--dataset", "builtin", "--out", str(tmp_path / "afile" / "s")]),
                          "not a folder")


def test_complete_store_needs_overwrite_and_other_settings_refused(tiny, tmp_path):
    out = tmp_path / "s"
    assert harvest([*tiny, "--dataset", "builtin", "--out", str(out)]).exit_code == 0
    before = Cache.open(out).token_ids()
    assert_one_line_error(harvest([*tiny, "--dataset", "builtin", "--out", str(out)]), "--overwrite")
    # An unfinished store from other settings is never appended to.
    import json
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["routesae"]["progress"]["complete"] = False
    (out / "zarr.json").write_text(json.dumps(meta))
    assert_one_line_error(harvest([*tiny, "--dataset", "builtin", "--layers", "1", "--out", str(out)]), "layers")
    assert (Cache.open(out).token_ids() == before).all()
    assert harvest([*tiny, "--dataset", "builtin", "--layers", "1", "--out", str(out), "--overwrite"]).exit_code == 0
    assert Cache.open(out).layers == [1]


def test_not_a_store_is_never_replaced(tiny, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_one_line_error(harvest([*tiny, "--dataset", "builtin", "--out", str(out), "--overwrite"]), "not a routesae store")
    assert (out / "precious.txt").read_text() == "keep me"


def test_disk_full_keeps_committed_tokens(tiny_llama_dir, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = mnt / "s.zarr"
        r = harvest(["--model", str(tiny_llama_dir), "--dataset", "builtin", "--tokens", "65536", "--layers", "all",
                     "--dtype", "float32", "--shard-tokens", "4096", "--out", str(out)])
        assert_one_line_error(r, "disk full")
        cache = Cache.open(out)
        assert not cache.complete and cache.n_tokens > 0
        assert cache.acts(cache.layers[-1], 0, cache.n_tokens).isfinite().all()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
