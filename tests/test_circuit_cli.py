"""`routesae circuit` and `circuit-data` as a person meets them: a wrong task file fails before any
model or SAE loads, with one line; each phase says what it does and bars move on stderr (none with
--quiet); and on a CPU without native bf16 the model runs in float32 (model/compute_dtype.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from routesae.cli import main
from routesae.model import compute_dtype
from test_circuit_masks import tiny_task
from tiny_models import save_tiny

LAYERS = (1, 2, 3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny Llama, its bf16 store and TopK SAEs at layers 1-3 (runs/topk-k8-l{1,2,3}), a task."""
    from routesae.harvest.run import HarvestConfig, run_harvest
    from routesae.train.config import FitConfig
    from routesae.train.trainer import fit

    root = tmp_path_factory.mktemp("circuit")
    model_dir = save_tiny("llama", root / "model")
    run_harvest(HarvestConfig(out=str(root / "s.zarr"), model=str(model_dir), dataset="builtin", tokens=4096,
                              layers="all", context_len=32, batch_size=8, progress=False, min_chunk_bytes=1024))
    fit(FitConfig(cache=str(root / "s.zarr"), out=str(root / "runs"), archs=["topk"], ks=[8], latents=64,
                  batch_size=256, eval_tokens=0.25, layer=list(LAYERS), progress=False, tokens=4096))
    tiny_task(root / "task.jsonl")
    return root


def _runs(world: Path) -> list[str]:
    return [str(world / "runs" / f"topk-k8-l{i}") for i in LAYERS]


def _circuit(world: Path, task: Path | str, out: Path, *extra: str):
    return CliRunner().invoke(main, ["circuit", "--task", str(task), "--saes", *_runs(world), "--lambdas", "0.001,0.1",
                                     "--steps", "6", "--ig-steps", "2", "--device", "cpu", "--out", str(out), *extra])


# --- a wrong task file fails first --------------------------------------------------------------------
def _line(**fields) -> str:
    base = {"clean_prefix": " the a", "patch_prefix": " the of", "clean_answer": " be", "patch_answer": " are",
            "split": "train"}
    return json.dumps({**base, **fields})


GARBAGE = {
    "missing": (None, "no task file at"),
    "folder": ("<dir>", "no task file at"),
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "is not UTF-8 text"),
    "not json": ("clean_prefix,patch_prefix\nthe,a\n", ":1 is not JSON"),
    "a list": ("[1, 2, 3]\n", ":1 lacks one of clean_prefix"),
    "wrong fields": (json.dumps({"prompt": "the", "answer": " be"}) + "\n", ":1 lacks one of"),
    "number answer": (_line(clean_answer=3) + "\n", ":1 lacks one of"),
    "empty": ("", "holds no records"),
    "blank lines": ("\n  \n\n", "holds no records"),
    "bad split": (_line() + "\n" + _line(split="test") + "\n", ":2: split must be 'train' or 'eval', got 'test'"),
    "no eval": ((_line() + "\n") * 3, "has no eval records (3 train, 0 eval)"),
    "no train": ((_line(split="eval") + "\n") * 2, "has no train records (0 train, 2 eval)"),
}


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model, tokenizer or SAE load fails the test: the task must be refused before them."""
    import routesae.model.loading as loading
    import routesae.train.load as sae_load

    def refuse(*args, **kwargs):
        raise AssertionError("loaded something before the task file was checked")

    for module, name in ((loading, "load_model"), (loading, "load_store_model"), (loading, "load_tokenizer"),
                         (sae_load, "load_sae")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("case", list(GARBAGE))
def test_a_wrong_task_file_fails_in_one_line_before_anything_loads(world, tmp_path, nothing_loads, case):
    content, message = GARBAGE[case]
    task = tmp_path / "task.jsonl"
    if content == "<dir>":
        task.mkdir()
    elif isinstance(content, bytes):
        task.write_bytes(content)
    elif content is not None:
        task.write_text(content)
    res = _circuit(world, task, tmp_path / "out")
    assert res.exit_code == 1, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("routesae: error: "), res.output
    assert message in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_a_task_without_usable_pairs_fails_before_the_model_loads(world, tmp_path, monkeypatch):
    # every answer two tokens: only the tokenizer can tell, and it is all that loads
    import routesae.model.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the task was tokenized")

    monkeypatch.setattr(loading, "load_model", refuse)
    task = tmp_path / "task.jsonl"
    task.write_text("".join(_line(clean_answer=" be be", split=s) + "\n" for s in ("train", "eval")))
    res = _circuit(world, task, tmp_path / "out")
    assert res.exit_code == 1, res.output
    assert res.output.splitlines()[-1].startswith("routesae: error: the task needs usable pairs in both splits")
    assert "answer not one token" in res.output


# --- phases and bars ----------------------------------------------------------------------------------
PHASES = ("loading 3 SAE(s)", "loading model", "task ", "computing the patch means",
          "scoring the eval split with every node on and every node off", "integrated gradients (2 steps per SAE)",
          "training masks at lambda 0.001 (1 of 2): 6 steps", "training masks at lambda 0.1 (2 of 2)",
          "lambda 0.1: ", "writing ")
BARS = ("patch means", "m(M), m(empty)", "IG + AtP", "masks lambda 0.001", "masks lambda 0.1", "scores lambda 0.1")


def test_every_phase_has_a_line_and_a_bar_on_stderr(world, tmp_path):
    res = _circuit(world, world / "task.jsonl", tmp_path / "out")
    assert res.exit_code == 0, res.output
    err = res.stderr
    at = [err.find(p) for p in PHASES]
    assert all(i >= 0 for i in at), [p for p, i in zip(PHASES, at) if i < 0]
    assert at == sorted(at), "the phases come in the order they run"
    assert all(b in err for b in BARS), [b for b in BARS if b not in err]
    assert "0/6 [" in err  # the mask bar counts steps
    assert "wrote" not in err and res.stdout.startswith("lambda 0.001: ")  # stdout keeps the summary alone
    quiet = _circuit(world, world / "task.jsonl", tmp_path / "quiet", "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout == res.stdout.replace(str(tmp_path / "out"), str(tmp_path / "quiet"))


def test_circuit_data_says_what_it_does(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "model")
    res = CliRunner().invoke(main, ["circuit-data", "--task", "list-index", "--model", str(model_dir), "--n", "12",
                                    "--device", "cpu", "--out", str(tmp_path / "t.jsonl")])
    assert res.exit_code == 0, res.output
    err = res.stderr
    for phrase in ("generating 12 list-index pairs", "loading model", "in float32 (--dtype float32)",
                   "scoring the model on", "list-index:", "scoring:"):
        assert phrase in err, (phrase, err)
    assert "kept 12 pairs" in res.stdout and "generating" not in res.stdout


# --- the compute dtype --------------------------------------------------------------------------------
@pytest.fixture
def model_dtypes(monkeypatch) -> list[torch.dtype]:
    """The parameter dtype of every model load_model loads."""
    import routesae.model.loading as loading

    seen: list[torch.dtype] = []
    real = loading.load_model

    def spy(*args, **kwargs):
        loaded = real(*args, **kwargs)
        seen.append(next(loaded.model.parameters()).dtype)
        return loaded

    monkeypatch.setattr(loading, "load_model", spy)
    return seen


@pytest.mark.parametrize("native, want", [(frozenset(), torch.float32), (frozenset({"bfloat16"}), torch.bfloat16)])
def test_circuit_runs_a_bf16_store_in_float32_on_a_cpu_without_bf16(world, tmp_path, monkeypatch, model_dtypes,
                                                                    native, want):
    monkeypatch.setattr(compute_dtype, "native_cpu_dtypes", lambda: native)
    assert json.loads((Path(_runs(world)[0]) / "config.json").read_text())["model"]["dtype"] == "bfloat16"
    res = _circuit(world, world / "task.jsonl", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert model_dtypes == [want]
    model = json.loads((tmp_path / "out" / "circuit.json").read_text())["model"]
    assert model["dtype"] == str(want).removeprefix("torch.")
    if want == torch.float32:
        assert model["dtype_reason"] == "this CPU has no native bf16; recorded bfloat16"
        assert "loading model" in res.stderr and "in float32 (this CPU has no native bf16" in res.stderr


def test_circuit_dtype_option(world, tmp_path, monkeypatch, model_dtypes):
    # an explicit dtype is obeyed (with a note where it is slow); a wrong one is refused by click
    monkeypatch.setattr(compute_dtype, "native_cpu_dtypes", lambda: frozenset())
    res = _circuit(world, world / "task.jsonl", tmp_path / "out", "--dtype", "bfloat16")
    assert res.exit_code == 0, res.output
    assert model_dtypes == [torch.bfloat16] and "far slower than float32" in res.stderr
    bad = _circuit(world, world / "task.jsonl", tmp_path / "bad", "--dtype", "fp8")
    assert bad.exit_code == 2 and "'fp8' is not one of" in bad.output
