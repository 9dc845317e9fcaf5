"""`routesae circuit-data`: the task generators' invariants over seeds with the real SmolLM2
tokenizer (equal prompt lengths, single-token answers, answers that Python itself would print),
and the command end to end on a tiny Llama, its logit differences against a plain forward here."""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routesae.circuits.tasks import GENERATORS, TaskConfig, generate
from routesae.cli import main
from routesae.errors import RouteSAEError
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def tok():
    from routesae.model.loading import load_tokenizer

    return load_tokenizer("smollm2")


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _repl_answer(prefix: str) -> str:
    """What CPython prints first for the transcript's last line: the value's first character, or
    'Traceback' for a missing key/index (computed here, independently of the generator)."""
    lines = [ln[4:] for ln in prefix.strip("\n").split("\n")]
    name, value = lines[0].split(" = ", 1)
    expr = re.sub(r"^print\((.*)\)$", r"\1", lines[1])
    try:
        out = eval(expr, {name: ast.literal_eval(value)})
    except (KeyError, IndexError):
        return "Traceback"
    return str(out)[0]


def _check_records(tok, task, records):
    for r in records:
        assert set(r) >= {"clean_prefix", "patch_prefix", "clean_answer", "patch_answer", "split", "task", "id"}
        assert r["task"] == task and r["split"] in ("train", "eval")
        c, p = _ids(tok, r["clean_prefix"]), _ids(tok, r["patch_prefix"])
        assert len(c) == len(p) == r["n_tokens"]
        assert r["clean_prefix"] != r["patch_prefix"] and r["clean_answer"] != r["patch_answer"]
        for prefix, base in ((r["clean_prefix"], c), (r["patch_prefix"], p)):
            for ans, want in ((r["clean_answer"], r["clean_answer_id"]), (r["patch_answer"], r["patch_answer_id"])):
                full = _ids(tok, prefix + ans)
                assert full[:-1] == base and full[-1] == want, (prefix, ans)
        if task in ("list-index", "dict-key"):
            assert _repl_answer(r["clean_prefix"]) == r["clean_answer"]
            want = _repl_answer(r["patch_prefix"])
            assert want == r["patch_answer"] if task == "list-index" else want.startswith(r["patch_answer"])
        if task == "dict-key":
            assert _repl_answer(r["patch_prefix"]) == "Traceback"
        if task == "ioi":  # the answer is the name not repeated as the subject
            for prefix, ans in ((r["clean_prefix"], r["clean_answer"]), (r["patch_prefix"], r["patch_answer"])):
                assert prefix.count(ans.strip()) == 1
        if task == "sva":  # the pair differs in one word, the subject
            diff = [(a, b) for a, b in zip(r["clean_prefix"].split(), r["patch_prefix"].split()) if a != b]
            assert len(diff) == 1 and len(r["clean_prefix"].split()) == len(r["patch_prefix"].split())


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), task=st.sampled_from(sorted(GENERATORS)))
def test_pairs_hold_invariants_over_seeds(tok, seed, task):
    data = generate(TaskConfig(task, n=48, seed=seed), tok)
    assert len(data.records) == 48 and data.dropped >= 0
    _check_records(tok, task, data.records)
    assert [r["id"] for r in data.records] == list(range(48))
    assert sum(r["split"] == "eval" for r in data.records) == round(0.2 * 48)
    assert len({(r["clean_prefix"], r["patch_prefix"]) for r in data.records}) == 48


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_seed_decides_data_and_split(tok, task):
    a, b = generate(TaskConfig(task, n=40, seed=3), tok), generate(TaskConfig(task, n=40, seed=3), tok)
    assert a.records == b.records
    c = generate(TaskConfig(task, n=40, seed=4), tok)
    assert [r["clean_prefix"] for r in c.records] != [r["clean_prefix"] for r in a.records]


def test_sva_has_every_variant(tok):
    variants = {r["variant"] for r in generate(TaskConfig("sva", n=200, seed=0), tok).records}
    assert variants == {"simple", "pp", "rc", "within_rc"}


def test_list_index_changes_index_or_list(tok):
    records = generate(TaskConfig("list-index", n=100, seed=0), tok).records
    assert {r["variant"] for r in records} == {"index", "value"}
    for r in records:
        clean_list, patch_list = (p.split("\n")[0] for p in (r["clean_prefix"], r["patch_prefix"]))
        assert (clean_list == patch_list) == (r["variant"] == "index")


def test_bad_input_is_one_error(tok):
    with pytest.raises(RouteSAEError, match="unknown task"):
        generate(TaskConfig("nope"), tok)
    with pytest.raises(RouteSAEError, match="at least 1"):
        generate(TaskConfig("sva", n=0), tok)


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task"),
    (["--task", "sva", "--n", "0"], "at least 1"),
    (["--task", "sva", "--model", "/no/such/model"], "not a model folder"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    res = CliRunner().invoke(main, ["circuit-data", *args, "--no-eval", "--out", str(tmp_path / "t.jsonl")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routesae: error:") and message in lines[0]


def test_cli_on_tiny_llama(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = save_tiny("llama", tmp_path / "model")
    out = tmp_path / "li.jsonl"
    res = CliRunner().invoke(main, ["circuit-data", "--task", "list-index", "--model", str(model_dir), "--n", "20",
                                    "--seed", "1", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(records) == 20
    _check_records(tok, "list-index", records)
    summary = json.loads((tmp_path / "li.jsonl.summary.json").read_text())
    assert summary["n"] == 20 and summary["splits"] == {"train": 16, "eval": 4}
    assert "kept 20 pairs" in res.output and "mean logit diff" in res.output

    # The figures against a plain forward, one prompt at a time, BOS prepended.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    d_clean, d_patch = [], []
    for r in (r for r in records if r["split"] == "eval"):
        for prefix, sink, good, bad in ((r["clean_prefix"], d_clean, r["clean_answer_id"], r["patch_answer_id"]),
                                        (r["patch_prefix"], d_patch, r["patch_answer_id"], r["clean_answer_id"])):
            ids = torch.tensor([[tok.bos_token_id, *_ids(tok, prefix)]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            sink.append(float(logits[good] - logits[bad]))
    ev = summary["eval"]
    assert ev["n"] == 4
    assert ev["clean_logit_diff"] == pytest.approx(sum(d_clean) / 4, abs=1e-4)
    assert ev["patch_logit_diff"] == pytest.approx(sum(d_patch) / 4, abs=1e-4)
    assert ev["clean_accuracy"] == pytest.approx(sum(d > 0 for d in d_clean) / 4)


def test_cli_no_eval(tmp_path):
    out = tmp_path / "ioi.jsonl"
    res = CliRunner().invoke(main, ["circuit-data", "--task", "ioi", "--n", "10", "--no-eval", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 10
    assert "eval" not in json.loads((tmp_path / "ioi.jsonl.summary.json").read_text())
