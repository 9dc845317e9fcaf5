"""What a new user trips on: damaged stores, closed pipes, messages on the bar's line, resumes that
say so, checks made before the model loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from routesae.cli import main
from routesae.store.verify import check_files, verify
from routesae.store.zarr_store import Cache
from synthetic_store import make_store

ARRAYS = ["token_ids", "positions", "special", "acts/1"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("routesae: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def fit_args(store, out):
    return ["fit", "--cache", store, "--out", out, "--arch", "topk", "--layer", 1, "--latents", 32, "--k", 4,
            "--batch-size", 64, "--buffer-tokens", 256, "--eval-tokens", 0.25, "--no-progress"]


@pytest.fixture(scope="module", params=["none", "blosc-zstd"])
def world(request, tmp_path_factory):
    """A sound store (4 shards of 256 tokens per array) and a TopK SAE fitted on it."""
    root = tmp_path_factory.mktemp(f"robust-{request.param}")
    make_store(root / "s.zarr", 1024, layers=[0, 1], chunk_contexts=4, shard_chunks=4, storage_dtype="bfloat16",
               compression=request.param)
    assert invoke(*fit_args(root / "s.zarr", root / "sae")).exit_code == 0
    return root


def damaged_copy(world: Path, tmp_path: Path, array: str, shard: int, how: str) -> tuple[Path, Path]:
    """A copy of the world's store with one file damaged. -> (the store, the file)."""
    store = tmp_path / "s.zarr"
    shutil.copytree(world / "s.zarr", store)
    path = store / array / "c" / str(shard)
    path = path / "0" if array.startswith("acts") else path
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "delete":
        path.unlink()
    elif how == "garble":  # same size and index, the first chunk's compressed bytes overwritten
        data[40 : len(data) // 2] = b"\xff" * (len(data) // 2 - 40)
        path.write_bytes(bytes(data))
    return store, path


@pytest.mark.parametrize("array", ARRAYS)
@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_truncated_or_missing_file_is_named_by_every_command(world, tmp_path, array, how):
    store, path = damaged_copy(world, tmp_path, array, 1, how)
    out = tmp_path / "fit"
    one_line_error(invoke(*fit_args(store, out)), str(path))
    assert not out.exists()  # a failed start leaves nothing behind
    one_line_error(invoke("eval", "--sae", world / "sae", "--cache", store, "--quiet"), str(path))
    quick = invoke("info", store)
    assert quick.exit_code == 1 and f"DAMAGED      {path}" in quick.output and "(complete, DAMAGED)" in quick.output
    full = invoke("info", "--verify", "--quiet", store)
    assert full.exit_code == 1 and f"DAMAGED      {path}" in full.output, full.output
    assert f"`routesae repair {store}` harvests them again" in full.stderr and "Traceback" not in full.output


def test_a_garbled_compressed_chunk_is_named_where_it_is_read(world, tmp_path):
    if Cache.open(world / "s.zarr").layout.compression == "none":
        pytest.skip("uncompressed chunks have no checksum (see test_a_changed_raw_chunk_is_found_by_the_statistics)")
    # same sizes, so only decoding finds it: fit in the training range, eval in the held-out tail
    for shard, command in ((0, fit_args), (3, None)):
        sub = tmp_path / str(shard)
        store, path = damaged_copy(world, sub, "acts/1", shard, "garble")
        assert check_files(Cache.open(store)) == (20, [])  # nothing the quick look can see
        if command:
            message = one_line_error(invoke(*command(store, sub / "fit")), str(path))
            assert "damaged file of acts/1" in message
            assert not (sub / "fit").exists()
        else:
            one_line_error(invoke("eval", "--sae", world / "sae", "--cache", store, "--quiet"), str(path))
        result = verify(Cache.open(store), progress=False)
        assert [(d.path, d.array) for d in result.damage] == [(path, "acts/1")]


def test_a_changed_raw_chunk_is_found_by_the_statistics(world, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(world / "s.zarr", store)
    cache = Cache.open(store)
    if cache.layout.compression != "none":
        pytest.skip("compressed chunks fail to decode instead")
    path = store / "acts" / "0" / "c" / "2" / "0"
    data = bytearray(path.read_bytes())
    data[: 64 * 32] = bytes(64 * 32)  # 64 tokens of layer 0 zeroed, sizes and index intact
    path.write_bytes(bytes(data))
    assert check_files(cache)[1] == [] and invoke("info", store).exit_code == 0
    result = verify(cache, progress=False)
    assert [(d.path, d.array) for d in result.damage] == [(store / "acts" / "0", "acts/0")]
    assert "values changed since the harvest" in result.damage[0].problem
    assert result.bytes_read == 2 * 1024 * 16 * 2


def test_a_sound_store_verifies(world):
    cache = Cache.open(world / "s.zarr")
    assert verify(cache, progress=False).damage == []
    r = invoke("info", "--verify", "--quiet", "--json", world / "s.zarr")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["damaged_files"] == [] and summary["files_checked"] == 20
    assert summary["verified_bytes"] == 2 * 1024 * 16 * 2 and summary["bytes_per_token_per_layer"] == 32


def test_info_says_uncompressed_instead_of_a_ratio(world):
    r = invoke("info", world / "s.zarr")
    compressed = Cache.open(world / "s.zarr").layout.compression != "none"
    assert r.exit_code == 0
    assert ("compressed " in r.output) == compressed and ("uncompressed" in r.output) != compressed


def test_a_closed_pipe_ends_quietly(world):
    # `routesae info STORE | head` where head has gone before info writes: a real pipe, read end closed
    info = subprocess.Popen([sys.executable, "-m", "routesae.cli", "info", str(world / "s.zarr")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info.stdout.close()
    err = info.stderr.read().decode()
    assert info.wait(timeout=60) == 141 and err == "", err  # 128 + SIGPIPE, as `yes | head` gives


def test_a_stale_fit_folder_is_started_afresh(world, tmp_path):
    # a fit killed before its first checkpoint left fit.json: a rerun with other settings starts anew
    out = tmp_path / "fit"
    out.mkdir()
    (out / "fit.json").write_text(json.dumps({"fit": {"lr": 1.0}, "cache_fingerprint": "elsewhere"}))
    (out / "metrics.jsonl").write_text("")
    r = invoke(*fit_args(world / "s.zarr", out))
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file()
    # a folder holding a finished fit is still refused
    one_line_error(invoke(*fit_args(world / "s.zarr", out), "--lr", "1e-3"), "other settings")


def test_errors_start_on_their_own_line_whatever_bar_is_showing():
    # a bar drawn on stderr, then an error: the error must not land on the bar's line
    script = (
        "import sys; from tqdm import tqdm; from routesae.cli import _fail\n"
        "bar = tqdm(total=10, desc='eval (cache)', file=sys.stderr); bar.update(3)\n"
        "_fail('routesae: error: boom', 1)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "\nroutesae: error: boom" in r.stderr or r.stderr.startswith("routesae: error: boom"), repr(r.stderr)
    last = r.stderr.rstrip("\n").split("\n")[-1]
    assert last.split("\r")[-1] == "routesae: error: boom", repr(r.stderr)


def test_sweep_bar_labels_its_numbers():
    from routesae.train.trainer import _postfix

    class Run:
        def __init__(self, name):
            self.name = name

    text = _postfix([Run("topk-k32"), Run("topk-k64")], [{"nmse": 0.7, "dead_frac": 0.39}, {"nmse": 0.5, "dead_frac": 0.1}])
    assert text == "topk-k32 nmse=0.700 dead=39% | topk-k64 nmse=0.500 dead=10%"


def test_baselines_both_is_accepted():
    from routesae.evaluate.cli import _baselines
    from routesae.evaluate.run import BASELINES

    assert _baselines("both") == list(BASELINES) and _baselines("none") == []


# --- harvest: checks before the model loads, what it says ------------------------------------------


@pytest.fixture()
def no_model_load(monkeypatch):
    """Makes loading the weights an error: what a test then sees was checked before they load."""
    import routesae.harvest.run as run

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the arguments were checked")

    monkeypatch.setattr(run, "load_model", refuse)


def harvest(model_dir, out, *extra):
    return invoke("harvest", "--quiet", "--model", model_dir, "--context-len", 32, "--batch-size", 4,
                  "--out", out, *extra)


def test_layers_out_of_range_are_refused_before_the_model_loads(tiny_llama_dir, tmp_path, no_model_load):
    one_line_error(harvest(tiny_llama_dir, tmp_path / "s", "--dataset", "builtin", "--tokens", 256, "--layers", "2-9"),
                   "out of range", "hidden_states 0..")
    one_line_error(harvest(tiny_llama_dir, tmp_path / "s", "--dataset", "builtin", "--tokens", 10**7,
                           "--context-len", 10**6), "exceeds what")
    assert not (tmp_path / "s").exists()


def test_a_missing_text_field_is_refused_before_the_model_loads(tiny_llama_dir, tmp_path, no_model_load):
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "some words"}\n')
    one_line_error(harvest(tiny_llama_dir, tmp_path / "s", "--dataset", data, "--tokens", 256), "--text-field", "body")


def test_tokens_rounded_to_whole_contexts_are_announced(tiny_llama_dir, tmp_path):
    r = harvest(tiny_llama_dir, tmp_path / "s", "--dataset", "builtin", "--tokens", 100)
    assert r.exit_code == 0, r.output
    assert "--tokens 100 is not a whole number of 32-token contexts: harvesting 96 tokens (3 contexts)" in r.stderr
    assert "wrote 96 tokens" in r.output
    exact = harvest(tiny_llama_dir, tmp_path / "t", "--dataset", "builtin", "--tokens", 96)
    assert exact.exit_code == 0 and "whole number" not in exact.stderr
