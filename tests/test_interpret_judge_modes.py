"""The judge's modes against the loopback fake of test_interpret_judge.py, made to honour or ignore
response_format (json_schema), logprobs and logit_bias as real servers do, and to answer like a
small chatty model (the right answer, wrapped in words no free-text parser reads): what each mode
asks for, that every reply then parses, delphi's AUROC from the judge's probabilities (checked
against a pair count of the fake's own probabilities), and which mode auto detects."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
from routesae.errors import RouteSAEError
from routesae.interpret import judge as judge_module
from routesae.interpret import judge_cli
from routesae.interpret import protocols as P
from routesae.interpret.judge import Judge, JudgeConfig
from test_interpret_judge import (SAMPLES, TRIGGERS, FakeJudge, _cli, _explained_token, _interpret, chatty,
                                  truth_of, truthful, write_contexts)


@pytest.fixture(scope="module")
def ctx_dir(tmp_path_factory) -> Path:
    return write_contexts(tmp_path_factory.mktemp("ctx") / "fake-k4")


@pytest.fixture
def serve():
    judges = []

    def start(policy=chatty, honours=(), tokenizer=None) -> FakeJudge:
        judges.append(FakeJudge(policy))
        judges[-1].honours = set(honours)
        judges[-1].tokenizer = tokenizer
        return judges[-1]

    yield start
    for j in judges:
        j.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _latent(token: str) -> str:
    return str(TRIGGERS.index(" " + token))


def _pair_auroc(truth: list[int], scores: list[float]) -> float:
    """AUROC as the share of (activating, negative) pairs ranked right, ties counting half."""
    pos = [s for t, s in zip(truth, scores) if t == 1]
    neg = [s for t, s in zip(truth, scores) if t == 0]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))


# -- each mode ------------------------------------------------------------------------------------

def test_a_chatty_judge_fails_to_parse_in_free_mode(ctx_dir, tmp_path, serve):
    """The contrast for the tests below: without constraints, the chatty judge's replies do not parse."""
    judge = serve()
    _, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 2)
    assert doc["judge"]["mode"] == "free"
    assert doc["summary"]["paper"]["parse_failures"] == 2
    assert doc["summary"]["detection"]["parse_failures"] == 2 * 2 * SAMPLES


def test_json_schema_mode_parses_every_reply(ctx_dir, tmp_path, serve):
    judge = serve(honours={"json_schema"})
    result, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 3)
    assert doc["judge"]["mode"] == "json_schema" and "judge mode: json_schema" in result.output
    paper = doc["summary"]["paper"]
    assert paper["parse_failures"] == 0 and paper["mean_score"] == 5 and paper["counts"]["low-level"] == 3
    for p in ("detection", "fuzzing"):
        s = doc["summary"][p]
        assert s["parse_failures"] == 0 and s["balanced_accuracy"] == 1.0 and "auroc" not in s
    # what was asked: the paper's schema, and one with as many answers as the request has windows
    formats = [b["response_format"] for b in judge.bodies if b["messages"][0]["content"] != "Answer the question with yes or no."
               and "response_format" in b]
    assert {f["type"] for f in formats} == {"json_schema"} and all(f["json_schema"]["strict"] for f in formats)
    assert sum(f["json_schema"]["schema"] == P.PAPER_SCHEMA for f in formats) == 3
    for body in judge.bodies:
        if body["messages"][0]["content"] in P.HELD_OUT_JSON.values():
            n = len(truth_of(body["messages"]))
            items = body["response_format"]["json_schema"]["schema"]["properties"]["answers"]
            assert items["minItems"] == items["maxItems"] == n and items["items"]["enum"] == [0, 1]
    assert doc["settings"]["windows_per_request"] == 5


def test_logprobs_mode_scores_auroc_from_the_judges_probabilities(ctx_dir, tmp_path, serve):
    seen: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def p_yes(messages: list[dict]) -> float:
        # activating windows lean higher, but overlap the negatives: an AUROC between 0.5 and 1
        truth = truth_of(messages)[0]
        noise = zlib.crc32(messages[-1]["content"].encode()) % 1000 / 1000
        p = 0.1501 + 0.5 * noise + 0.2003 * truth  # never exactly 0.5, and no activating and negative tie
        protocol = "detection" if messages[0]["content"] == P.DETECTION_ONE_SYSTEM else "fuzzing"
        truths, ps = seen.setdefault((_latent(_explained_token(messages[-1]["content"])), protocol), ([], []))
        truths.append(truth)
        ps.append(p)
        return p

    judge = serve(honours={"json_schema", "logprobs"})
    judge.p_yes = p_yes
    result, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 3)
    assert doc["judge"]["mode"] == "logprobs" and "AUROC" in result.output
    assert doc["summary"]["paper"]["parse_failures"] == 0 and doc["settings"]["windows_per_request"] == 1
    assert {lat for lat, _ in seen} == set(doc["latents"])
    aurocs = []
    for (lat, p), (truths, ps) in seen.items():
        entry = doc["latents"][lat][p]
        want = _pair_auroc(truths, ps)
        assert entry["auroc"] == pytest.approx(want, abs=1e-9) and entry["parse_failures"] == 0
        assert entry["n"] == 2 * SAMPLES
        # the thresholded verdict: P(1) > 0.5
        said = [int(x > 0.5) for x in ps]
        tpr = sum(s and t for s, t in zip(said, truths)) / sum(truths)
        tnr = sum(not s and not t for s, t in zip(said, truths)) / (len(truths) - sum(truths))
        assert entry["balanced_accuracy"] == pytest.approx((tpr + tnr) / 2)
        aurocs.append((p, want))
    for p in ("detection", "fuzzing"):
        values = [a for q, a in aurocs if q == p]
        assert doc["summary"][p]["auroc"] == pytest.approx(sum(values) / len(values))
    assert any(0.5 < a < 1 for _, a in aurocs)  # a real test of the ranking, not a perfect split
    # what was asked: one window a request, one token, with logprobs
    for body in judge.bodies:
        if body["messages"][0]["content"] in (P.DETECTION_ONE_SYSTEM, P.FUZZING_ONE_SYSTEM):
            assert body["logprobs"] is True and body["top_logprobs"] == judge_module.TOP_LOGPROBS
            assert body["max_tokens"] == 1 and not body.get("stream")


def test_logit_bias_mode_forces_the_answer_tokens(ctx_dir, tmp_path, serve, tokenizer, tiny_llama_dir):
    judge = serve(honours={"logit_bias"}, tokenizer=tokenizer)
    result, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 3,
                             "--judge-tokenizer", tiny_llama_dir)
    assert doc["judge"]["mode"] == "logit_bias" and "honours logit_bias" in doc["judge"]["mode_reason"]
    paper = doc["summary"]["paper"]
    assert paper["parse_failures"] == 0 and paper["mean_score"] == 5 and paper["counts"]["low-level"] == 3
    for entry in doc["latents"].values():
        assert entry["paper"]["explanation"] == "the trigger token"
    for p in ("detection", "fuzzing"):
        s = doc["summary"][p]
        assert s["parse_failures"] == 0 and s["balanced_accuracy"] == 1.0 and "auroc" not in s
    forced = {"verdict": 0, "category": 0, "score": 0}
    for body in judge.bodies:
        system = body["messages"][0]["content"]
        want = {P.DETECTION_ONE_SYSTEM: ("verdict", {"1", "0"}), P.FUZZING_ONE_SYSTEM: ("verdict", {"1", "0"}),
                P.PAPER_CATEGORY_SYSTEM: ("category", {"1", "2", "3"}),
                P.PAPER_SCORE_SYSTEM: ("score", {"1", "2", "3", "4", "5"})}.get(system)
        if want is None:
            continue
        forced[want[0]] += 1
        bias = body["logit_bias"]
        assert body["max_tokens"] == 1 and set(bias.values()) == {100}
        # the raised ids are exactly the answers' one-token spellings in the judge's vocabulary
        assert {tokenizer.decode([int(i)]).strip() for i in bias} == want[1]
        for answer in want[1]:
            assert str(tokenizer.convert_tokens_to_ids(answer)) in bias
    assert forced == {"verdict": 3 * 2 * 2 * SAMPLES, "category": 3, "score": 3}


# -- detection -------------------------------------------------------------------------------------

PROBE_SYSTEM = judge_module.PROBE_MESSAGES[0]["content"]


@pytest.mark.parametrize("honours, with_tokenizer, mode, reason", [
    ((), False, "free", "logit_bias was not tried"),
    ((), True, "free", "honours none of"),
    (("logit_bias",), True, "logit_bias", "honours logit_bias"),
    (("json_schema",), True, "json_schema", "not logprobs"),
    (("logprobs",), False, "logprobs", "not response_format"),
    (("json_schema", "logprobs", "logit_bias"), True, "logprobs", "response_format and logprobs"),
])
def test_auto_detects_what_the_server_honours(tmp_path, serve, tokenizer, tiny_llama_dir, honours, with_tokenizer,
                                              mode, reason):
    judge = serve(truthful, honours, tokenizer)
    cfg = JudgeConfig(model="fake-judge", url=judge.url, cache_dir=tmp_path / "cache",
                      tokenizer=str(tiny_llama_dir) if with_tokenizer else None)
    choice = Judge(cfg).resolve_mode()
    assert choice.mode == mode and reason in choice.why
    probes = [b for b in judge.bodies if b["messages"][0]["content"] == PROBE_SYSTEM]
    assert len(probes) == judge.chats and probes[0]["response_format"]["type"] == "json_schema"
    assert probes[0]["logprobs"] is True
    # logit_bias is tried only where neither of the others is honoured, and only with a tokenizer
    assert len(probes) == (2 if with_tokenizer and not {"json_schema", "logprobs"} & set(honours) else 1)
    # the findings are cached: asked again, nothing is sent
    again = Judge(cfg).resolve_mode()
    assert again.mode == mode and judge.chats == len(probes)


def test_a_server_that_rejects_the_fields_is_free(tmp_path, serve):
    judge = serve(truthful)
    judge.fail = [400, 400]  # a strict server refusing response_format and logprobs, then response_format alone
    choice = Judge(JudgeConfig(model="fake-judge", url=judge.url)).resolve_mode()
    assert choice.mode == "free" and judge.chats == 2
    schema_only = serve(truthful, ("json_schema",))
    schema_only.fail = [400]  # it takes response_format, but refuses logprobs
    choice = Judge(JudgeConfig(model="fake-judge", url=schema_only.url)).resolve_mode()
    assert choice.mode == "json_schema" and schema_only.chats == 2
    assert "logprobs" not in schema_only.bodies[-1] and "response_format" in schema_only.bodies[-1]


def test_a_served_folder_is_its_own_tokenizer(tmp_path, serve, tokenizer, tiny_llama_dir):
    """transformers serve names the model by its folder: the answers' ids come from that folder."""
    judge = serve(truthful, ("logit_bias",), tokenizer)
    backend = judge_module.OpenAIBackend(JudgeConfig(model=str(tiny_llama_dir), url=judge.url))
    assert backend.answer_ids(["1"])["1"][0] == tokenizer.convert_tokens_to_ids("1")
    nameless = judge_module.OpenAIBackend(JudgeConfig(model="gpt-x", url=judge.url))
    with pytest.raises(RouteSAEError, match="pass --judge-tokenizer"):
        nameless.answer_ids(["1"])


def test_a_named_mode_sends_no_probe(ctx_dir, tmp_path, serve):
    judge = serve(truthful)
    _, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 1, "--protocols", "paper",
                        "--judge-mode", "free")
    assert judge.chats == 1 and doc["judge"]["mode"] == "free" and doc["judge"]["mode_reason"] == "as --judge-mode asked"


def test_modes_that_do_not_fit_the_judge_are_one_line(ctx_dir, tmp_path, serve):
    judge = serve(truthful)
    for args, message in (
            (["--judge-url", judge.url, "--judge-model", "fake-judge", "--judge-mode", "constrained"],
             "--judge-mode constrained runs a local: judge"),
            (["--judge-model", "local:/nowhere", "--judge-mode", "json_schema"],
             "--judge-mode json_schema asks a server"),
            (["--judge-url", judge.url, "--judge-model", "fake-judge", "--judge-mode", "logit_bias"],
             "pass --judge-tokenizer")):
        result = _cli("--contexts", ctx_dir, "--features", 1, "--out", tmp_path / "i.json", "--quiet", *args)
        assert result.exit_code == 1, result.output
        line, = result.output.strip().splitlines()
        assert line.startswith("routesae: error:") and message in line
    assert not (tmp_path / "i.json").exists()


def test_cli_offers_the_judge_modules_modes():
    assert judge_cli.JUDGE_MODES == judge_module.JUDGE_MODES


# -- parsing ----------------------------------------------------------------------------------------

def test_choice_replies():
    assert P.parse_choice(" 1", ("1", "0")) == P.Choice("1", None)
    assert P.parse_choice("Sure, 1", ("1", "0")) == P.Choice(None, None)
    reply = json.dumps({"content": "0", "top_logprobs": [["0", math.log(0.3)], [" 1", math.log(0.1)],
                                                         ["1", math.log(0.2)], ["The", math.log(0.4)]]})
    choice = P.parse_choice(reply, ("1", "0"))
    assert choice.answer == "0" and choice.probs == pytest.approx({"1": 0.3, "0": 0.3})
    verdict, p = P.verdict_of_choice(reply)
    assert p == pytest.approx(0.5) and verdict == 0  # P(1) > 0.5 says yes; a tie does not
    assert P.verdict_of_choice(json.dumps({"content": "x", "top_logprobs": [["The", -0.1]]})) == (None, None)
    assert P.paper_from_choices("2", " 4", "Mentions of rivers.") == ("high-level", 4, "Mentions of rivers.")
    assert P.paper_from_choices("4", "4", "x") is None


def test_json_replies():
    good = json.dumps({"category": "high-level", "score": 3, "explanation": " legal text "})
    assert P.parse_paper_json(good) == ("high-level", 3, "legal text")
    assert P.parse_paper_json("```json\n" + good + "\n```") == ("high-level", 3, "legal text")
    assert P.parse_paper_json(json.dumps({"category": "high-level", "score": 7, "explanation": ""})) is None
    assert P.parse_paper_json(json.dumps({"category": "mid", "score": 3, "explanation": ""})) is None
    assert P.parse_paper_json("Category: low-level\nScore: 2") == ("low-level", 2, "")  # not JSON: read as text
    assert P.parse_verdicts_json('{"answers": [1, 0, 1]}', 3) == [1, 0, 1]
    assert P.parse_verdicts_json('{"answers": [1, 0]}', 3) == [None] * 3
    assert P.parse_verdicts_json('{"answers": [1, true, 2]}', 3) == [1, None, None]
    assert P.parse_verdicts_json("[1, 0, 0]", 3) == [1, 0, 0]


def test_auroc_is_the_pair_ranking():
    truth = [1, 0, 1, 0, 1, 0, 0]
    scores = [0.9, 0.8, 0.4, 0.1, 0.4, 0.4, None]
    kept = [(t, s) for t, s in zip(truth, scores) if s is not None]
    assert P.auroc(truth, scores) == pytest.approx(_pair_auroc([t for t, _ in kept], [s for _, s in kept]))
    assert P.auroc([1, 1], [0.2, 0.3]) is None
    s = P.binary_scores(truth, [1, 1, 0, 0, 0, 0, None], scores)
    assert s["auroc"] == pytest.approx(P.auroc(truth, scores)) and s["parse_failures"] == 1
    assert "auroc" not in P.binary_scores(truth, [1] * 7)
    summary = P.summarize_binary([s, {**s, "auroc": None}, P.binary_scores([1, 0], [1, 0], [0.9, 0.1])])
    assert summary["auroc"] == pytest.approx((s["auroc"] + 1.0) / 2)
