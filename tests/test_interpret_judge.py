"""`routesae interpret` against judges written here: a tiny HTTP server on 127.0.0.1 speaking the
chat-completions JSON, whose policy reads each prompt and answers from the truth (perfect), against
it (inverted), always the same (constant) or nonsense (garbage). The contexts folder is synthetic,
built from formats.md: every activating window holds its latent's trigger token, no negative does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from routesae.cli import main
from routesae.errors import RouteSAEError
from routesae.interpret import protocols as P
from routesae.interpret import judge as judge_module
from routesae.interpret.judge import cache_key
from routesae.interpret.run_interpret import InterpretConfig, load_contexts, select_latents

# -- a synthetic contexts folder ------------------------------------------------------------------

FILLER = [f" w{i}" for i in range(40)]
TRIGGERS = [f" ZAP{chr(97 + i)}" for i in range(8)]
TEXTS = ["<pad>", "<bos>", "<eos>", *FILLER, *TRIGGERS]
N_LATENTS = 8
ELIGIBLE = list(range(2, 8))
"""Latent 0 is dead, latent 1 has too few top examples."""
SAMPLES, NEGATIVES, WINDOW, MARK = 4, 6, 9, 4


def _trigger(lat: int) -> int:
    return TEXTS.index(TRIGGERS[lat])


def write_contexts(folder: Path, overlap: bool = False, complete: bool = True) -> Path:
    """A contexts folder by formats.md. Activating windows: the trigger at MARK (activation 5) and
    a weak token (1, under 0.3 * 5, so never marked); negatives: filler only."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    start = [0]

    def window(lat: int | None, paper: bool = False) -> dict:
        ids = [int(x) for x in rng.integers(3, 3 + len(FILLER), WINDOW)]
        ex = {"token_index": None, "activation": 0.0, "layer": None, "start": start[0], "mark": None, "token_ids": ids}
        start[0] += 20
        if lat is not None:
            ids[MARK] = _trigger(lat)
            acts = [0.0] * WINDOW
            acts[MARK], acts[1] = 5.0, 1.0
            ex.update(token_index=ex["start"] + MARK, activation=5.0, mark=MARK)
            if not paper:
                ex["acts"] = acts
        return ex

    lines = []
    for lat in range(N_LATENTS):
        n_top = 0 if lat == 0 else 2 if lat == 1 else 5
        rec = {"latent": lat, "count": n_top * 3, "frequency": 0.01, "max": 5.0 if n_top else 0.0, "histogram": [0] * 60,
               "layers": None, "top": [window(lat) for _ in range(n_top)],
               "quantiles": [[window(lat)], [window(lat)]] if n_top else [[], []],
               "samples": [window(lat) for _ in range(SAMPLES if n_top else 0)],
               "negatives": [window(None) for _ in range(NEGATIVES)],
               "paper": [window(lat, paper=True) for _ in range(4)] if lat == 2 else None,
               "paper_distinct": 1, "interpretable": lat == 2}
        if overlap and lat == 3:
            rec["samples"][0]["start"] = rec["top"][0]["start"] + 2
        lines.append(json.dumps(rec))
    (folder / "latents.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "tokens.json").write_text(json.dumps(TEXTS))
    manifest = {"format": "routesae-contexts", "version": 1, "complete": complete,
                "sae": {"name": "fake-k4", "path": "runs/fake-k4", "arch": "topk", "layers": [3], "n_latents": N_LATENTS,
                        "k": 4, "weights_sha256": "0" * 64},
                "store": {"path": "store.zarr", "fingerprint": "f00d", "context_len": 64}, "tokens": [0, 4096],
                "n_tokens": 4000, "settings": {}, "layers": None, "paper_rule": {"interpretable": 1}}
    (folder / "contexts.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def ctx_dir(tmp_path_factory) -> Path:
    return write_contexts(tmp_path_factory.mktemp("ctx") / "fake-k4")


# -- judges -------------------------------------------------------------------------------------

def _windows(user: str) -> list[str]:
    return re.findall(r"^Window(?: \d+)?: (.*)$", user, re.M)


def _explained_token(user: str) -> str:
    return re.search(r"^Explanation: the token (\S+)", user, re.M).group(1)


DETECTION_SYSTEMS = (P.DETECTION_SYSTEM, P.HELD_OUT_JSON["detection"], P.DETECTION_ONE_SYSTEM)
ONE_SYSTEMS = (P.DETECTION_ONE_SYSTEM, P.FUZZING_ONE_SYSTEM)


def truth_of(messages: list[dict]) -> list[int]:
    """Whether each window of a held-out question is one where its latent fires, from the text:
    detection, the trigger is in it; fuzzing, the trigger alone is marked."""
    system, user = messages[0]["content"], messages[-1]["content"]
    token = _explained_token(user)
    if system in DETECTION_SYSTEMS:
        return [int(token in w) for w in _windows(user)]
    return [int({m.strip() for m in re.findall(r"<<(.*?)>>", w)} == {token}) for w in _windows(user)]


def truthful(messages: list[dict], flip: bool = False) -> str:
    """Answers as one who knows each latent's trigger: explains it, and judges windows by it, in
    the form each question asks for."""
    system, user = messages[0]["content"], messages[-1]["content"]
    if system == P.PAPER_SYSTEM:
        return "Category: low-level\nScore: 5\nExplanation: the trigger token"
    if system == P.PAPER_JSON_SYSTEM:
        return json.dumps({"category": "low-level", "score": 5, "explanation": "the trigger token"})
    if system == P.PAPER_CATEGORY_SYSTEM:
        return "1"
    if system == P.PAPER_SCORE_SYSTEM:
        return "5"
    if system == P.PAPER_EXPLAIN_SYSTEM:
        return "the trigger token"
    if system == P.EXPLAIN_SYSTEM:
        marked = re.findall(r"<<(.*?)>>", user)
        return f"The marks are all the same.\nExplanation: the token {max(set(marked), key=marked.count).strip()}"
    if "Explanation: the token" not in user:
        return "Yes."  # anything else (the judge module's probe)
    verdicts = [int(t != flip) for t in truth_of(messages)]
    if system in ONE_SYSTEMS:
        return str(verdicts[0])
    if system in P.HELD_OUT_JSON.values():
        return json.dumps({"answers": verdicts})
    return f"[{', '.join(map(str, verdicts))}]"


def chatty(messages: list[dict]) -> str:
    """A small model's manners: the right answer, but wrapped in chatter that no free-text parser
    reads (no 'Category:' line, no [..] list); JSON and digits stay inside it."""
    system = messages[0]["content"]
    answer = truthful(messages)
    if system in (P.EXPLAIN_SYSTEM, P.PAPER_EXPLAIN_SYSTEM):
        return answer
    if system == P.PAPER_SYSTEM:
        return "I would call this low-level and give it 5 out of 5: the trigger token."
    if not answer.startswith("{"):
        answer = answer.replace("[", "(").replace("]", ")")  # a list, but not one in square brackets
    return f"Sure! I would answer {answer}, hope this helps."


def _instance(schema: dict):
    """The smallest value a JSON schema allows (a constrained decoder's reply to a policy without JSON)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {k: _instance(v) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [_instance(schema["items"]) for _ in range(schema.get("minItems", 0))]
    return {"string": "", "integer": 0, "number": 0.0, "boolean": False}.get(kind)


def inverted(messages: list[dict]) -> str:
    return truthful(messages, flip=True)


def constant(messages: list[dict]) -> str:
    system, user = messages[0]["content"], messages[-1]["content"]
    if system in (P.PAPER_SYSTEM, P.EXPLAIN_SYSTEM):
        return truthful(messages)
    return "[" + ", ".join("1" for _ in _windows(user)) + "]"


def garbage(messages: list[dict]) -> str:
    return "I like turtles."


def pieces(reply: str) -> list[str]:
    """How the fake server streams a reply: word by word, each with the spaces before it."""
    return re.findall(r"\s*\S+|\s+", reply)


class FakeJudge:
    """An OpenAI-compatible server on 127.0.0.1: /v1/models and /v1/chat/completions, which streams
    its reply (server-sent events, one word a chunk) when asked to, unless `streams` is off."""

    def __init__(self, policy: Callable[[list[dict]], str]):
        self.policy = policy
        self.hits: list[str] = []
        self.auth: set[str] = set()
        self.times: list[float] = []
        """When each chat request arrived (time.monotonic, server side)."""
        self.fail: list[int | tuple[int, dict[str, str]]] = []
        """HTTP statuses (or status and headers) to answer the next chat requests with, first to last."""
        self.streams = True
        """Stream when the request asks to; off: a plain JSON reply whatever is asked (some servers)."""
        self.streamed = 0
        """Chat requests answered as a stream."""
        self.break_after: int | None = None
        """Close the next streamed reply after this many of its events, without the rest."""
        self.after_piece: Callable[[int], None] | None = None
        """Called after each word of a streamed reply is sent, with its index (slows the stream down)."""
        self.block_after: int | None = None
        """Answer this many chat requests, then hold the others until `release` is set."""
        self.answered = 0
        self.release = threading.Event()
        self.honours: set[str] = set()
        """What the server does with a request's response_format, logprobs and logit_bias: those named
        here ("json_schema", "logprobs", "logit_bias") it honours, the others it ignores (as
        transformers serve does with the first two)."""
        self.tokenizer = None
        """The served model's tokenizer: what logit_bias's ids mean (needed when it honours logit_bias)."""
        self.p_yes: Callable[[list[dict]], float] | None = None
        """P(1) of a one-digit question, for the log-probabilities it returns (honouring logprobs)."""
        self.bodies: list[dict] = []
        """Every chat request that reached the policy, as sent."""
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _stream(self, model: str, reply: str) -> None:
                def event(delta: dict, finish: str | None = None) -> bytes:
                    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                    return f"data: {json.dumps(chunk)}\n\n".encode()

                words = pieces(reply)
                events = [event({"role": "assistant", "content": ""}), *(event({"content": w}) for w in words),
                          event({}, "stop"), b"data: [DONE]\n\n"]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                # The length of the whole stream: a reply cut short is one the client can tell is.
                self.send_header("Content-Length", str(sum(map(len, events))))
                self.end_headers()
                with judge.lock:
                    cut, judge.break_after = judge.break_after, None
                for i, data in enumerate(events):
                    if cut is not None and i == cut:
                        return  # the connection closes mid-reply
                    self.wfile.write(data)
                    self.wfile.flush()
                    if 1 <= i <= len(words) and judge.after_piece is not None:
                        judge.after_piece(i - 1)

            def do_GET(self):
                judge.hits.append(self.path)
                judge.auth.add(self.headers.get("Authorization", ""))
                self._send(200, {"object": "list", "data": [{"id": "fake-judge", "object": "model", "owned_by": "me"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.hits.append(self.path)
                    judge.times.append(time.monotonic())
                    judge.auth.add(self.headers.get("Authorization", ""))
                    status, headers = (lambda f: f if isinstance(f, tuple) else (f, {}))(
                        judge.fail.pop(0) if judge.fail else 200)
                    hold = judge.block_after is not None and judge.answered >= judge.block_after
                if hold:
                    judge.release.wait(60)
                    return
                if status != 200:
                    return self._send(status, {"error": {"message": f"status {status} on purpose"}}, headers)
                if request.get("model") != "fake-judge":
                    return self._send(404, {"detail": f"no model {request.get('model')}"})
                with judge.lock:
                    judge.bodies.append(request)
                bias = request.get("logit_bias") or {}
                if "logit_bias" in judge.honours and any(not isinstance(v, float) for v in bias.values()):
                    # as transformers serve does, whose logit_bias becomes generate's sequence_bias
                    return self._send(400, {"detail": f"`sequence_bias` has to be a dict with floats as values, "
                                                      f"but is {bias}."})
                reply, logprobs = judge.answer(request)
                with judge.lock:
                    judge.answered += 1
                if request.get("stream") and judge.streams:
                    with judge.lock:
                        judge.streamed += 1
                    return self._stream(request["model"], reply)
                choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}
                if logprobs is not None:
                    choice["logprobs"] = {"content": logprobs}
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                                 "choices": [choice],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, request: dict) -> tuple[str, list[dict] | None]:
        """The reply to a chat request, and the log-probabilities of its first token when asked and
        honoured: the policy's words, held to the request's response_format, logit_bias and
        max_tokens as far as this server honours them (a constrained decoder lets only what fits through)."""
        messages = request["messages"]
        reply = self.policy(messages)
        fmt = request.get("response_format")
        if "json_schema" in self.honours and fmt:
            found = re.search(r"\{.*\}", reply, re.S)
            reply = found.group(0) if found else json.dumps(_instance(fmt["json_schema"]["schema"]))
        if "logit_bias" in self.honours and request.get("logit_bias"):
            ids = [int(i) for i, bias in request["logit_bias"].items() if bias > 0]
            texts = [self.tokenizer.decode([i]) for i in ids]
            # of the raised tokens, the one the policy says first (its answer); none: the first raised
            said = [(m.start(), t) for t in texts
                    for m in [re.search(rf"(?<!\w){re.escape(t.strip())}(?!\w)", reply)] if m]
            reply = min(said)[1] if said else texts[0]
        elif request.get("max_tokens") == 1:
            reply = (pieces(reply) or [""])[0]
        logprobs = None
        if "logprobs" in self.honours and request.get("logprobs"):
            if self.p_yes is not None and messages[0]["content"] in (P.DETECTION_ONE_SYSTEM, P.FUZZING_ONE_SYSTEM):
                p = self.p_yes(messages)
                reply = "1" if p > 0.5 else "0"
                top = [("1", 0.98 * p), ("0", 0.98 * (1 - p)), ("The", 0.01)]
            else:
                top = [((pieces(reply) or [""])[0], 0.9)]
            logprobs = [{"token": top[0][0], "logprob": float(np.log(top[0][1])), "bytes": None,
                         "top_logprobs": [{"token": t, "logprob": float(np.log(q)), "bytes": None} for t, q in top]}]
        return reply, logprobs

    @property
    def chats(self) -> int:
        return sum(h.endswith("/chat/completions") for h in self.hits)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    judges = []

    def start(policy: Callable[[list[dict]], str] = truthful) -> FakeJudge:
        judges.append(FakeJudge(policy))
        return judges[-1]

    yield start
    for j in judges:
        j.close()


def _cli(*args: object, env: dict | None = None):
    return CliRunner().invoke(main, ["interpret", *map(str, args)], env=env)


def _interpret(ctx_dir: Path, judge: FakeJudge, out: Path, *extra: object):
    result = _cli("--contexts", ctx_dir, "--judge-url", judge.url, "--judge-model", "fake-judge", "--out", out,
                  "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


# -- scores from deterministic judges ----------------------------------------------------------

@pytest.mark.parametrize("policy, balanced, precision, recall", [
    (truthful, 1.0, 1.0, 1.0), (inverted, 0.0, 0.0, 0.0), (constant, 0.5, 0.5, 1.0)])
def test_perfect_inverted_and_constant_judges(ctx_dir, tmp_path, serve, policy, balanced, precision, recall):
    judge = serve(policy)
    result, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 4, "--seed", 3)
    assert doc["features"] == 4 and len(doc["latents"]) == 4
    for p in ("detection", "fuzzing"):
        s = doc["summary"][p]
        assert s["balanced_accuracy"] == pytest.approx(balanced) and s["parse_failures"] == 0 and s["latents"] == 4
        assert s["precision"] == pytest.approx(precision) and s["recall"] == pytest.approx(recall)
        for entry in doc["latents"].values():
            # balanced: as many negatives as held-out activating windows
            assert entry[p]["n"] == 2 * SAMPLES and entry[p]["parse_failures"] == 0
            assert entry[p]["balanced_accuracy"] == pytest.approx(balanced)
    for lat, entry in doc["latents"].items():
        assert entry["explanation"] == f"the token {TRIGGERS[int(lat)].strip()}"
        assert entry["paper"]["category"] == "low-level" and entry["paper"]["score"] == 5
        assert entry["paper"]["source"] == ("paper" if lat == "2" else "top")
    assert doc["summary"]["paper"]["mean_score"] == 5 and doc["summary"]["paper"]["counts"]["low-level"] == 4
    assert "balanced accuracy" in result.output and "| detection | 4 |" in result.output


def test_output_follows_formats_md(ctx_dir, tmp_path, serve):
    judge = serve()
    _, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 2, "--temperature", 0.1,
                        "--max-tokens", 77)
    assert doc["format"] == "routesae-interpretations" and doc["version"] == 1
    assert doc["contexts"]["path"] == str(ctx_dir.resolve()) and doc["contexts"]["sae"]["name"] == "fake-k4"
    assert doc["contexts"]["store"]["fingerprint"] == "f00d"
    assert doc["judge"] == {"url": judge.url, "model": "fake-judge", "temperature": 0.1, "max_tokens": 77, "mode": "free",
                            "mode_reason": doc["judge"]["mode_reason"]}
    # the fake honours nothing, and its model name is no tokenizer folder: logit_bias cannot be tried
    assert "logit_bias was not tried" in doc["judge"]["mode_reason"] and "--judge-tokenizer" in doc["judge"]["mode_reason"]
    assert doc["protocols"] == ["paper", "detection", "fuzzing"] and doc["seed"] == 0 and doc["features"] == 2
    assert set(doc["summary"]) == {"paper", "detection", "fuzzing"}
    assert set(doc["summary"]["paper"]) >= {"mean_score", "mean_score_low_level", "mean_score_high_level", "counts",
                                            "parse_failures"}
    assert set(doc["summary"]["paper"]["counts"]) == set(P.CATEGORIES)
    for entry in doc["latents"].values():
        assert set(entry) == {"paper", "explanation", "detection", "fuzzing"}
        assert set(entry["detection"]) == {"balanced_accuracy", "precision", "recall", "f1", "n", "parse_failures"}
    assert not list(tmp_path.glob(".interp.json.*.tmp")) and not (tmp_path / "interp.json.partial").exists()


def test_one_protocol_only(ctx_dir, tmp_path, serve):
    judge = serve()
    _, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 3, "--protocols", "detection")
    assert doc["protocols"] == ["detection"] and set(doc["summary"]) == {"detection"}
    # the mode probe, then one explanation and two batches of 5 windows (8 windows) per latent
    assert judge.chats == 1 + 3 + 3 * 2
    assert all(set(e) == {"explanation", "detection"} for e in doc["latents"].values())


def test_garbage_judge_gives_parse_failures_not_scores(ctx_dir, tmp_path, serve):
    judge = serve(garbage)
    result, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 3)
    paper = doc["summary"]["paper"]
    assert paper["parse_failures"] == 3 and paper["mean_score"] is None and sum(paper["counts"].values()) == 0
    for entry in doc["latents"].values():
        assert entry["paper"] == {"parse_failure": True, "reply": "I like turtles.", "source": entry["paper"]["source"]}
        for p in ("detection", "fuzzing"):
            assert entry[p]["n"] == 0 and entry[p]["parse_failures"] == 2 * SAMPLES
            assert entry[p]["balanced_accuracy"] is None
    assert doc["summary"]["detection"]["parse_failures"] == 3 * 2 * SAMPLES
    assert doc["summary"]["detection"]["balanced_accuracy"] is None
    assert "parse failures" in result.output


def test_empty_reply_leaves_no_explanation_and_no_held_out_score(ctx_dir, tmp_path, serve):
    judge = serve(lambda m: "" if m[0]["content"] == P.EXPLAIN_SYSTEM else truthful(m))
    _, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 2)
    for entry in doc["latents"].values():
        assert entry["explanation"] is None and entry["detection"] is None and entry["fuzzing"] is None
    assert doc["summary"]["detection"]["latents"] == 0 and doc["summary"]["paper"]["mean_score"] == 5


# -- parsing and scoring -------------------------------------------------------------------------

@pytest.mark.parametrize("reply, want", [
    ("Category: low-level\nScore: 4\nExplanation: the word 'bank' as a river bank", ("low-level", 4, "the word 'bank' as a river bank")),
    ("**Category:** High-level\n**Score:** 3/5\n**Explanation:** legal contracts", ("high-level", 3, "legal contracts")),
    ("category = undiscernible\nscore: 1.\nExplanation:\n  nothing in common", ("undiscernible", 1, "nothing in common")),
    ("Sure! Category: \"low level\" Score: (5)", ("low-level", 5, "")),
])
def test_paper_replies_that_parse(reply, want):
    assert tuple(P.parse_paper(reply)) == want


@pytest.mark.parametrize("reply", [
    "", "I like turtles.", "Category: low-level\nExplanation: no score given",
    "Score: 4\nExplanation: no category", "Category: low-level\nScore: 7", "Category: mid-level\nScore: 3",
    "Category: low-level\nScore: 4.5", P.PAPER_SYSTEM.split("exactly these three lines and nothing else:\n")[1],
    "Category: <low-level | high-level | undiscernible>\nScore: <1-5>\nExplanation: <one sentence>",
])
def test_paper_replies_that_do_not_parse(reply):
    assert P.parse_paper(reply) is None


def test_explanation_is_the_last_line():
    assert P.parse_explanation("Thinking...\nThey are all numbers.\nExplanation: digits in dates") == "digits in dates"
    assert P.parse_explanation("Explanation: first\nmore text\n**Explanation:** second\n") == "second"
    assert P.parse_explanation("Lots of reasoning.\nNames of rivers") == "Names of rivers"
    assert P.parse_explanation("") is None and P.parse_explanation(" \n\n") is None


def test_verdict_lists():
    assert P.parse_verdicts("[1, 0, 1, 1, 0]", 5) == [1, 0, 1, 1, 0]
    assert P.parse_verdicts("Let me see [x]. Final: [1 0 yes no true]", 5) == [1, 0, 1, 0, 1]
    assert P.parse_verdicts("[1, maybe, 0]", 3) == [1, None, 0]
    assert P.parse_verdicts("[1, 0]", 3) == [None] * 3
    assert P.parse_verdicts("no list here", 2) == [None, None]
    for system in (P.DETECTION_SYSTEM, P.FUZZING_SYSTEM):  # a judge echoing the instructions answers nothing
        assert P.parse_verdicts(system, 5) == [None] * 5
    assert P.parse_verdicts("Yes", 1) == [1] and P.parse_verdicts("1", 1) == [1] and P.parse_verdicts("hmm", 1) == [None]


def test_binary_scores():
    s = P.binary_scores([1, 1, 1, 0, 0, 0, 1], [1, 1, 0, 0, 1, 0, None])
    assert s["n"] == 6 and s["parse_failures"] == 1
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(2 / 3)
    none = P.binary_scores([1, 0], [0, 0])
    assert none["balanced_accuracy"] == 0.5 and none["precision"] is None and none["recall"] == 0 and none["f1"] == 0
    assert P.binary_scores([1, 1], [1, 1])["balanced_accuracy"] is None  # no negative: undefined


def test_marks_and_rendering():
    vocab = P.Vocab(["a", " b", "\n", " c"])
    assert P.render([0, 1, 2, 3], vocab, {1, 3}) == "a <<b>>\\n <<c>>"
    assert P.strong_positions({"acts": [0.0, 1.0, 0.29, 0.3, 0.0], "mark": 1}) == [1, 3]
    assert P.strong_positions({"mark": 2, "token_ids": [0, 0, 0]}) == [2]  # paper contexts carry no acts


def test_fuzzing_marks_as_many_random_tokens_in_negatives(ctx_dir):
    ctx = load_contexts(ctx_dir)
    rec = ctx.record(4)
    windows = P.held_out_windows(rec, ctx.vocab, "fuzzing", np.random.default_rng(0))
    assert sorted(w.activating for w in windows) == [0] * SAMPLES + [1] * SAMPLES
    for w in windows:
        marked = re.findall(r"<<(.*?)>>", w.text)
        assert len(marked) == 1 and (marked == [TRIGGERS[4].strip()]) == bool(w.activating)
    plain = P.held_out_windows(rec, ctx.vocab, "detection", np.random.default_rng(0))
    assert all("<<" not in w.text for w in plain)
    every = P.held_out_windows(rec, ctx.vocab, "detection", np.random.default_rng(0), balance=False)
    assert len(every) == SAMPLES + NEGATIVES


# -- latent sampling ---------------------------------------------------------------------------

def test_sample_is_seeded_among_eligible_latents(ctx_dir):
    ctx = load_contexts(ctx_dir)

    def draw(**kw):
        return select_latents(ctx, InterpretConfig(contexts=str(ctx_dir), out="x", judge_model="m", **kw))

    a, b = draw(features=3, seed=0), draw(features=3, seed=0)
    assert a == b and set(a.latents) <= set(ELIGIBLE) and a.available == len(ELIGIBLE) and not a.clamped
    assert set(draw(features=2, seed=0).latents) <= set(a.latents)  # a smaller sample is a subset
    assert any(draw(features=3, seed=s).latents != a.latents for s in range(1, 6))
    full = draw(features=100)
    assert full.latents == ELIGIBLE and full.clamped
    assert draw(latents=[1, 0 + 2]).latents == [1, 2]
    with pytest.raises(RouteSAEError, match="out of range"):
        draw(latents=[N_LATENTS])
    with pytest.raises(RouteSAEError, match="never fired"):
        draw(latents=[0])
    with pytest.raises(RouteSAEError, match="at least 1"):
        draw(features=0)


def test_features_beyond_the_eligible_are_clamped_with_a_warning(ctx_dir, tmp_path, serve):
    judge = serve()
    result, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 50, "--protocols", "paper")
    assert doc["features"] == len(ELIGIBLE) and sorted(map(int, doc["latents"])) == ELIGIBLE
    assert "warning: --features 50, but only 6 latents" in result.output


# -- cache, resume, secrets --------------------------------------------------------------------

def test_rerun_makes_no_request_and_needs_no_server(ctx_dir, tmp_path, serve):
    judge = serve()
    out = tmp_path / "interp.json"
    _, first = _interpret(ctx_dir, judge, out, "--features", 3)
    requests = judge.chats
    files = list((tmp_path / "interp.json.cache").glob("*.json"))
    assert requests > 0 and len(files) == requests
    second, again = _interpret(ctx_dir, judge, out, "--features", 3)
    assert judge.chats == requests and len(judge.hits) == requests + 1  # one GET /models, in the first run only
    assert again == first and f"0 judge requests, {requests} replies from the cache" in second.output
    judge.close()  # nothing listens any more: the cache alone answers
    _, third = _interpret(ctx_dir, judge, out, "--features", 3)
    assert third == first
    # another temperature is another key
    assert cache_key("m", [{"role": "user", "content": "x"}], {"temperature": 0.0, "max_tokens": 5}) != \
        cache_key("m", [{"role": "user", "content": "x"}], {"temperature": 0.1, "max_tokens": 5})


def test_a_killed_run_resumes(ctx_dir, tmp_path, serve):
    full = serve()
    _, want = _interpret(ctx_dir, full, tmp_path / "full.json", "--features", 3)
    total = full.chats
    judge = serve()
    judge.block_after = 4
    out = tmp_path / "interp.json"
    cmd = [sys.executable, "-m", "routesae.cli", "interpret", "--contexts", str(ctx_dir), "--judge-url", judge.url,
           "--judge-model", "fake-judge", "--features", "3", "--out", str(out), "--concurrency", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while judge.chats <= 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert judge.chats == 5, "the run should hang on its fifth request"
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists() and len(list((tmp_path / "interp.json.cache").glob("*.json"))) == 4
    again = serve()
    _, doc = _interpret(ctx_dir, again, out, "--features", 3)
    assert again.chats == total - 4 and doc == want | {"judge": doc["judge"]}


def test_api_key_is_sent_but_never_written(ctx_dir, tmp_path, serve):
    marker = "sk-MARKER-7f3a9c"
    judge = serve()
    result = _cli("--contexts", ctx_dir, "--judge-url", judge.url, "--judge-model", "fake-judge", "--features", 2,
                  "--out", tmp_path / "interp.json", "--quiet", env={"OPENAI_API_KEY": marker})
    assert result.exit_code == 0, result.output
    assert judge.auth == {f"Bearer {marker}"}
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 3
    for path in written:
        assert marker.encode() not in path.read_bytes(), path
    assert marker not in result.output


def test_dummy_key_when_none_is_set(ctx_dir, tmp_path, serve, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = serve()
    _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 1, "--protocols", "paper")
    assert judge.auth == {"Bearer not-needed"}


# -- failures ----------------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("quiet", [True, False])
def test_unreachable_judge_is_one_line_naming_the_url(ctx_dir, tmp_path, quiet):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    started = time.monotonic()
    result = _cli("--contexts", ctx_dir, "--judge-url", url, "--judge-model", "m", "--features", 1,
                  "--out", tmp_path / "interp.json", *(["--quiet"] if quiet else []))
    # at once, not after the client's retries and backoff (5 retries: 15 s and more)
    assert result.exit_code == 1 and time.monotonic() - started < 10
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routesae: error: the judge at") and url in lines[0]
    assert "does not answer" in lines[0]
    assert list(tmp_path.iterdir()) == []  # neither the output nor an empty reply cache


def test_reply_cache_folder_appears_with_the_first_reply(ctx_dir, tmp_path, serve):
    judge = serve()
    judge.fail = [404]  # refused, not retried: the run ends with no reply
    result = _cli("--contexts", ctx_dir, "--judge-url", judge.url, "--judge-model", "fake-judge", "--features", 1,
                  "--protocols", "paper", "--out", tmp_path / "interp.json", "--quiet")
    assert result.exit_code == 1 and judge.chats == 1 and list(tmp_path.iterdir()) == []
    _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 1, "--protocols", "paper")
    assert len(list((tmp_path / "interp.json.cache").glob("*.json"))) == 2  # the mode probe's findings, the reply


def test_429_waits_as_long_as_retry_after_says(ctx_dir, tmp_path, serve):
    judge = serve()
    judge.fail = [(429, {"Retry-After": "1"})]
    _, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 1, "--protocols", "paper",
                        "--concurrency", 1)
    assert judge.chats == 3 and doc["summary"]["paper"]["mean_score"] == 5  # the probe, asked twice, then the paper
    # measured where the requests arrive: the second came no sooner than the server asked
    assert judge.times[1] - judge.times[0] >= 1.0


def test_5xx_and_429_are_retried(ctx_dir, tmp_path, serve):
    judge = serve()
    judge.fail = [500, 429]
    _, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 1, "--protocols", "paper",
                        "--concurrency", 1)
    assert judge.chats == 4 and doc["summary"]["paper"]["mean_score"] == 5  # the probe, asked three times


def test_a_reply_broken_off_mid_stream_is_asked_again(ctx_dir, tmp_path, serve):
    judge = serve()
    judge.break_after = 3  # the role, then two words of the reply, then the connection closes
    _, doc = _interpret(ctx_dir, judge, tmp_path / "interp.json", "--features", 1, "--protocols", "paper",
                        "--concurrency", 1)
    assert judge.chats == 3 and judge.streamed == 2  # the probe (not streamed), the reply twice
    (entry,) = doc["latents"].values()
    assert entry["paper"]["score"] == 5 and entry["paper"]["explanation"] == "the trigger token"


def test_retries_run_out_in_one_line(ctx_dir, tmp_path, serve):
    judge = serve()
    judge.fail = [503, 503]
    result = _cli("--contexts", ctx_dir, "--judge-url", judge.url, "--judge-model", "fake-judge", "--features", 1,
                  "--protocols", "paper", "--max-retries", 1, "--out", tmp_path / "interp.json", "--quiet")
    assert result.exit_code == 1 and judge.chats == 2
    line, = result.output.strip().splitlines()
    assert "failed 2 times" in line and judge.url in line


def test_refused_request_is_not_retried(ctx_dir, tmp_path, serve):
    judge = serve()
    result = _cli("--contexts", ctx_dir, "--judge-url", judge.url, "--judge-model", "no-such-model", "--features", 1,
                  "--concurrency", 1, "--out", tmp_path / "interp.json", "--quiet")
    assert result.exit_code == 1 and judge.chats == 1
    line, = result.output.strip().splitlines()
    assert "HTTP 404" in line and "no model no-such-model" in line and "it serves fake-judge" in line


@pytest.mark.parametrize("damage, message", [
    ("missing", "has no contexts.json"), ("incomplete", "unfinished contexts pass"), ("broken", "not valid JSON"),
    ("parent", "holds the contexts of several SAEs"), ("overlap", "overlaps a training example"),
])
def test_bad_contexts_folders(tmp_path, serve, damage, message):
    folder = write_contexts(tmp_path / "sae", overlap=damage == "overlap", complete=damage != "incomplete")
    if damage == "missing":
        (folder / "contexts.json").unlink()
    elif damage == "broken":
        (folder / "contexts.json").write_text('{"format": "routesae-con')
    elif damage == "parent":
        folder = tmp_path
    judge = serve()
    result = _cli("--contexts", folder, "--judge-url", judge.url, "--judge-model", "fake-judge", "--out",
                  tmp_path / "interp.json", "--latents", "3", "--quiet")
    assert result.exit_code == 1 and judge.chats == 0
    line, = result.output.strip().splitlines()
    assert line.startswith("routesae: error:") and message in line


def test_bad_options(ctx_dir, tmp_path):
    for args, message in ((["--protocols", "paper,vibes"], "--protocols"), (["--concurrency", "0"], "--concurrency"),
                          (["--latents", "1,x"], "--latents")):
        result = _cli("--contexts", ctx_dir, "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
                      "--out", tmp_path / "i.json", *args)
        assert result.exit_code == 1 and message in result.output, result.output
    result = _cli("--contexts", ctx_dir, "--judge-model", "m", "--out", tmp_path / "i.json")
    assert result.exit_code == 1 and "--judge-url" in result.output


# -- the in-process local: judge -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["free", "auto"])
def test_local_judge_runs_and_caches(ctx_dir, tmp_path, tiny_llama_dir, monkeypatch, mode):
    """A tiny random Llama given a chat template, in-process. Free, it answers nonsense (parse
    failures); constrained (auto), every answer is one of the allowed ones, so every reply parses."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "chat-llama"
    shutil.copytree(tiny_llama_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(model)
    out = tmp_path / "interp.json"
    args = ("--contexts", ctx_dir, "--judge-model", f"local:{model}", "--features", 1, "--max-tokens", 8,
            "--judge-mode", mode, "--out", out, "--quiet")
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["judge"]["url"] == f"local:{model}" and doc["judge"]["max_tokens"] == 8
    if mode == "free":
        assert doc["judge"]["mode"] == "free" and doc["summary"]["paper"]["parse_failures"] == 1
    else:
        assert doc["judge"]["mode"] == "constrained" and "judge mode: constrained" in result.output
        assert doc["summary"]["paper"]["parse_failures"] == 0 and doc["settings"]["windows_per_request"] == 1
        (entry,) = doc["latents"].values()
        assert entry["paper"]["category"] in P.CATEGORIES and entry["paper"]["score"] in range(1, 6)
        for p in ("detection", "fuzzing"):
            if entry["explanation"] is None:  # a random model may explain with nothing at all
                continue
            assert entry[p]["parse_failures"] == 0 and entry[p]["n"] == 2 * SAMPLES and "auroc" in entry[p]
            assert "auroc" in doc["summary"][p]
    import routesae.model.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a cached rerun must not load the model"))
    again = _cli(*args)
    assert again.exit_code == 0 and "0 judge requests" in again.output
    assert json.loads(out.read_text()) == doc


# -- what --out may replace ------------------------------------------------------------------------

def test_out_of_another_sae_is_refused_before_any_request(ctx_dir, tmp_path, serve):
    other = write_contexts(tmp_path / "other-k4")
    manifest = json.loads((other / "contexts.json").read_text())
    manifest["sae"] |= {"name": "other-k4", "weights_sha256": "1" * 64}
    (other / "contexts.json").write_text(json.dumps(manifest))
    judge = serve()
    out = tmp_path / "interp.json"
    _, theirs = _interpret(other, judge, out, "--features", 1, "--protocols", "paper")
    asked = judge.chats
    refused = _cli("--contexts", ctx_dir, "--judge-url", judge.url, "--judge-model", "fake-judge", "--features", 1,
                   "--protocols", "paper", "--cache-dir", tmp_path / "mine.cache", "--out", out, "--quiet")
    assert refused.exit_code == 1 and judge.chats == asked and not (tmp_path / "mine.cache").exists()
    line, = refused.output.strip().splitlines()
    assert line == (f"routesae: error: {out} holds the interpretation of another SAE or store (other-k4, from "
                    f"{other.resolve()}); choose another --out, or pass --overwrite to replace it")
    assert json.loads(out.read_text()) == theirs
    _, mine = _interpret(ctx_dir, judge, out, "--features", 1, "--protocols", "paper", "--overwrite")
    assert mine["contexts"]["sae"]["name"] == "fake-k4"  # the same prompts: answered from the cache


def test_out_of_the_same_sae_is_rewritten_and_foreign_files_refused(ctx_dir, tmp_path, serve):
    judge = serve()
    out = tmp_path / "interp.json"
    _interpret(ctx_dir, judge, out, "--features", 1, "--protocols", "paper")
    asked = judge.chats
    # the same SAE with other settings: judged again, the reply already had from the cache
    _, more = _interpret(ctx_dir, judge, out, "--features", 2, "--protocols", "paper")
    assert more["features"] == 2 and judge.chats == asked + 1
    out.write_text("my notes\n")
    refused = _cli("--contexts", ctx_dir, "--judge-url", judge.url, "--judge-model", "fake-judge", "--features", 1,
                   "--out", out, "--quiet")
    assert refused.exit_code == 1 and out.read_text() == "my notes\n" and judge.chats == asked + 1
    assert refused.output.strip() == (f"routesae: error: {out} exists and is not an output of routesae interpret; "
                                      "choose another --out, or pass --overwrite to replace it")
    _, doc = _interpret(ctx_dir, judge, out, "--features", 1, "--protocols", "paper", "--overwrite")
    assert doc["format"] == "routesae-interpretations"
    folder = _cli("--contexts", ctx_dir, "--judge-url", judge.url, "--judge-model", "fake-judge", "--out", tmp_path,
                  "--quiet", "--overwrite")
    assert folder.exit_code == 1 and "is a folder" in folder.output


# -- streaming and progress ----------------------------------------------------------------------

class RecordingBar:
    """Stands in for tqdm in the judge module: records the bars' counts and the lines written."""

    bars: list["RecordingBar"] = []
    lines: list[str] = []
    changed = threading.Condition()

    def __init__(self, *args, desc: str = "", unit: str = "it", total: int | None = None, **kwargs):
        self.desc, self.unit, self.total, self.n, self.closed = desc, unit, total, 0, False
        with self.changed:
            self.bars.append(self)

    def update(self, n: int = 1) -> None:
        with self.changed:
            self.n += n
            self.changed.notify_all()

    def close(self) -> None:
        self.closed = True

    @classmethod
    def write(cls, line: str, file=None) -> None:
        cls.lines.append(line)

    @classmethod
    def of(cls, unit: str) -> "RecordingBar | None":
        return next((b for b in cls.bars if b.unit == unit), None)


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(RecordingBar, "bars", [])
    monkeypatch.setattr(RecordingBar, "lines", [])
    monkeypatch.setattr(judge_module, "tqdm", RecordingBar)
    return RecordingBar


def test_progress_moves_during_one_slow_streamed_reply(ctx_dir, tmp_path, serve, recording):
    judge = serve()
    seen: list[tuple[int, int] | None] = []

    def tokens_counted() -> int:
        bar = recording.of("tok")
        return bar.n if bar is not None else 0

    def after_piece(i: int) -> None:
        # The next word is sent only once the token bar has counted this one (or 10 s passed: then
        # the snapshot says so), so what is asserted is the order of events, never their timing.
        with recording.changed:
            ok = recording.changed.wait_for(lambda: tokens_counted() > i, timeout=10)
            seen.append((tokens_counted(), recording.of("req").n) if ok else None)

    judge.after_piece = after_piece
    out = tmp_path / "interp.json"
    result = _cli("--contexts", ctx_dir, "--judge-url", judge.url, "--judge-model", "fake-judge", "--latents", 3,
                  "--protocols", "paper", "--out", out)
    assert result.exit_code == 0, result.output
    words = pieces(truthful([{"role": "system", "content": P.PAPER_SYSTEM}, {"role": "user", "content": ""}]))
    assert len(words) >= 5 and judge.streamed == 1
    # one request: its token count went up word by word while it was still unanswered
    assert seen == [(i + 1, 0) for i in range(len(words))]
    assert recording.of("req").n == 1 and recording.of("tok").n == len(words)
    assert all(b.closed for b in recording.bars)
    assert recording.lines == [f"judge: contexts: 1 request to fake-judge at {judge.url}"]
    assert json.loads(out.read_text())["latents"]["3"]["paper"]["score"] == 5


def test_streamed_and_plain_replies_are_cached_alike(ctx_dir, tmp_path, serve):
    def cache(streams: bool) -> dict[str, str]:
        judge = serve()
        judge.streams = streams
        _interpret(ctx_dir, judge, tmp_path / f"{streams}.json", "--features", 2)
        assert judge.streamed == (judge.chats - 1 if streams else 0) and judge.chats > 2  # the probe is not streamed
        return {p.name: p.read_text() for p in (tmp_path / f"{streams}.json.cache").glob("*.json")}

    streamed, plain = cache(True), cache(False)
    assert streamed == plain and len(streamed) > 2


def test_announcement_names_the_judge_and_counts_what_the_cache_lacks(ctx_dir, tmp_path, serve, recording):
    judge = serve()
    args = ("--contexts", ctx_dir, "--judge-url", judge.url, "--judge-model", "fake-judge", "--protocols", "paper",
            "--out", tmp_path / "interp.json")
    assert _cli(*args, "--features", 2).exit_code == 0
    assert _cli(*args, "--features", 3).exit_code == 0
    assert recording.lines == [f"judge: contexts: 2 requests to fake-judge at {judge.url}",
                               f"judge: contexts: 1 request to fake-judge at {judge.url} (2 more answered from the cache)"]
    assert [b.n for b in recording.bars if b.unit == "req"] == [2, 1]


def test_local_judge_counts_its_tokens_as_it_generates(ctx_dir, tmp_path, tiny_llama_dir, recording):
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "chat-llama"
    shutil.copytree(tiny_llama_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(model)
    result = _cli("--contexts", ctx_dir, "--judge-model", f"local:{model}", "--latents", "2,3", "--protocols", "paper",
                  "--max-tokens", 6, "--judge-mode", "free", "--out", tmp_path / "interp.json")
    assert result.exit_code == 0, result.output
    assert recording.lines == [f"loading the judge {model} ...",
                               f"judge: contexts: 2 requests to local:{model} (in-process)"]
    # every generated token counted, the prompt not: at least one and at most 6 a reply
    assert recording.of("req").n == 2 and 2 <= recording.of("tok").n <= 12
