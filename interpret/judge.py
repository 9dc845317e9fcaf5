"""The judge: an LLM behind any OpenAI-compatible chat-completions server (`--judge-url`), or a local
transformers chat model run in-process (`--judge-model local:PATH`). Requests run a bounded number
at a time; the `openai` client retries connection errors, timeouts, 408, 409, 429 and 5xx with
exponential backoff, honouring the server's Retry-After; a reply that breaks off mid-stream is
asked again here. Every reply is cached on disk, one small JSON file per reply keyed by a sha256 of
(model, messages, sampling settings): a rerun costs nothing and a killed run resumes where it
stopped. Replies are streamed, so the progress shows tokens arriving during a long request.

The API key comes from the environment only (OPENAI_API_KEY; local servers ignore it) and goes
into neither the cache key nor any file."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

from routesae.atomic_files import write_json
from routesae.errors import RouteSAEError
from tqdm.auto import tqdm

Messages = list[dict[str, str]]
Received = Callable[[int], None]
"""Told how many reply tokens just arrived (a streamed piece counts as one: servers send about one token each)."""
API_KEY_ENV = "OPENAI_API_KEY"
DUMMY_KEY = "not-needed"
"""Sent when OPENAI_API_KEY is unset: local servers ignore the key, but the client wants one."""
LOCAL_PREFIX = "local:"
RETRY_STATUS = {408, 409, 429}
"""HTTP statuses the client retries besides 5xx: timeout, conflict, rate limit."""
RETRY_COUNT_HEADER = "x-stainless-retry-count"
"""The `openai` client numbers its attempts in this request header: how many it made, read back from an error."""
JUDGE_MODES = ("auto", "json_schema", "logprobs", "logit_bias", "constrained", "free")
"""How the judge's answers are made to parse (--judge-mode): auto detects; json_schema asks the server
for a JSON schema (response_format); logprobs also reads yes/no from log-probabilities; logit_bias
forces one token among the answers; constrained is logit_bias's local: twin (one forward pass, the
answers' logits compared); free is plain text, parsed as well as it can be."""
LOCAL_MODES = ("constrained", "free")
BIAS = 100.0
"""Added to the answer tokens' logits in logit_bias mode: nothing else can win. A float: transformers
serve refuses an integer bias (HTTP 400, "sequence_bias has to be a dict with floats as values")."""
TOP_LOGPROBS = 5
"""Candidates asked for with each answer token in logprobs mode (delphi's number)."""
PROBE_VERSION = 1
"""Part of the cached probe's key: a changed probe asks the server again."""
PROBE_MESSAGES: Messages = [{"role": "system", "content": "Answer the question with yes or no."},
                              {"role": "user", "content": "Is water wet?"}]
PROBE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
    "type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"], "additionalProperties": False}}}
PROBE_FORCED = "7"
"""The token the logit_bias probe forces: no answer to a yes/no question, so a reply of it means the bias ruled."""


@dataclass
class JudgeConfig:
    """Who judges and how it is asked."""

    model: str
    """Model name as the server knows it, or 'local:PATH' for an in-process transformers model."""
    url: str | None = None
    """Base URL of the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (none for local:)."""
    cache_dir: Path | None = None
    """One JSON file per reply (the folder is made with the first reply); None: no cache."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy; the RouteSAE paper used 0.1)."""
    max_tokens: int = 300
    """Longest reply, in tokens."""
    concurrency: int = 4
    """Requests in flight at once."""
    max_retries: int = 5
    """Retries of a request after a connection error, timeout, 408, 409, 429 or 5xx (the client's, with
    exponential backoff or the server's Retry-After), and of a reply that breaks off mid-stream."""
    timeout: float = 600.0
    """Seconds the server may stay silent on a request: before its reply starts, or between two pieces of it."""
    check_timeout: float = 5.0
    """Seconds the first look at the server's /models may take."""
    retry_base: float = 1.0
    """First delay in seconds before asking again a reply that broke off; doubled each retry, at most retry_cap."""
    retry_cap: float = 30.0
    """Longest such delay in seconds."""
    mode: str = "auto"
    """How answers are made to parse (JUDGE_MODES); auto: probe the server once (local:, constrained)."""
    tokenizer: str | None = None
    """The judge's tokenizer (a folder or hub name) for logit_bias; None: the model name, which for
    `transformers serve FOLDER` is the served folder."""

    @property
    def local(self) -> bool:
        return self.model.startswith(LOCAL_PREFIX)

    def sampling(self) -> dict[str, Any]:
        """The sampling settings sent with every request (part of the cache key, recorded in the output)."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def describe(self) -> str:
        """Who judges, in words: 'NAME at URL' or 'local:PATH (in-process)'."""
        return f"{self.model} (in-process)" if self.local else f"{self.model} at {self.url}"


class Backend(Protocol):
    def check(self) -> None:
        """Fail with one RouteSAEError line when the judge cannot answer at all."""

    def complete(self, messages: Messages, sampling: dict[str, Any], received: Received) -> str:
        """One reply, telling `received` of its tokens as they come; RouteSAEError when it cannot be had.
        sampling may hold `response_format` (sent as is) and `answer`: {"choices": [...], "how":
        "logit_bias" | "logprobs" | "constrained"}, a one-token answer among the choices; a reply
        with log-probabilities comes back as protocols.parse_choice reads it."""

    def probe(self) -> dict[str, Any]:
        """What the server honours: {"json_schema": bool, "logprobs": bool, "logit_bias": bool or
        None (not tried), "note": why not, or None}."""


def cache_key(model: str, messages: Messages, sampling: dict[str, Any]) -> str:
    blob = json.dumps({"model": model, "messages": messages, "sampling": sampling}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ReplyCache:
    """One JSON file per reply in a folder, each written atomically. The folder appears with its
    first reply, so a run that got none (a judge that does not answer) leaves nothing behind."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            data = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None  # absent, or damaged by hand: asked again
        reply = data.get("reply") if isinstance(data, dict) else None
        return reply if isinstance(reply, str) else None

    def put(self, key: str, model: str, sampling: dict[str, Any], reply: str) -> None:
        write_json(self._path(key), {"model": model, "sampling": sampling, "reply": reply}, indent=None)


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if cause is not None and str(cause).strip():
        text += f" ({str(cause).strip().splitlines()[0]})"
    return text


def _status_detail(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        for key in ("detail", "message", "error"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message")
            if value:
                return str(value).strip().splitlines()[0]
    return _first_line(e)


def _attempts(e: Any, fallback: int) -> int:
    """How many times the client sent the request that ended in `e` (its last attempt is numbered)."""
    try:
        return int(e.request.headers[RETRY_COUNT_HEADER]) + 1
    except (AttributeError, KeyError, TypeError, ValueError):
        return fallback


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a reply breaking off mid-stream raises: the client's own errors (openai >= 2 wraps the
    transport's), or the transport's errors unwrapped (older clients)."""
    import openai

    errors: list[type[BaseException]] = [openai.APIError]
    for name in ("httpx", "httpx2"):
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "HTTPError", None), type):
            errors.append(module.HTTPError)
    return tuple(errors)


def _choice_text(data: dict[str, Any]) -> str:
    """The reply text of a chat completion as a plain JSON object."""
    choices = (data.get("choices") or []) if isinstance(data, dict) else []
    message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def _top_logprobs(data: dict[str, Any]) -> list[list[Any]]:
    """The first reply token's candidates [[token, logprob], ...] of a chat completion as a plain
    JSON object; [] when the server sent none (it ignored `logprobs`)."""
    try:
        first = data["choices"][0]["logprobs"]["content"][0]
        return [[c["token"], float(c["logprob"])] for c in first.get("top_logprobs") or []
                if isinstance(c, dict) and isinstance(c.get("token"), str)]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return []


def answer_token_ids(tokenizer: Any, choices: list[str] | tuple[str, ...], where: str) -> dict[str, list[int]]:
    """Each answer's single-token spellings in the judge's vocabulary ("1" and " 1", as a reply may
    start with either); one line naming `where` when an answer has none."""
    out: dict[str, list[int]] = {}
    for choice in choices:
        ids: list[int] = []
        for variant in (choice, " " + choice):
            enc = tokenizer.encode(variant, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(int(enc[0]))
        if not ids:
            raise RouteSAEError(f"the tokenizer of {where} has no single token for the answer {choice!r}: "
                                "pass --judge-mode free")
        out[choice] = ids
    return out


class OpenAIBackend:
    """An OpenAI-compatible server through the `openai` client: its retries (with Retry-After) for
    the request, ours only for a streamed reply that breaks off after it started."""

    def __init__(self, cfg: JudgeConfig):
        from openai import OpenAI

        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        self.client = OpenAI(base_url=self.url, api_key=os.environ.get(API_KEY_ENV) or DUMMY_KEY,
                             max_retries=cfg.max_retries, timeout=cfg.timeout)
        self.served: list[str] = []
        self._tok: Any = None
        self._tok_lock = threading.Lock()

    def check(self) -> None:
        import openai

        # One quick try, no retries: a judge where nothing listens is said so in seconds, not after
        # the client's backoff.
        try:
            models = self.client.with_options(timeout=self.cfg.check_timeout, max_retries=0).models.list()
            self.served = [m.id for m in getattr(models, "data", None) or []]
        except openai.APIConnectionError as e:
            raise RouteSAEError(f"the judge at {self.url} does not answer ({_first_line(e)}); "
                                "start the server or fix --judge-url") from None
        except openai.AuthenticationError:
            raise RouteSAEError(f"the judge at {self.url} refused the API key (HTTP 401); set {API_KEY_ENV}") from None
        except openai.APIStatusError:
            pass  # it answers; some servers have no /models

    def _open(self, messages: Messages, sampling: dict[str, Any], stream: bool = True,
              tolerate: tuple[int, ...] = ()) -> Any:
        """The streamed reply's start (or, stream False, the whole reply); the client retries until
        it has one or gives up. A refusal with a status in `tolerate` returns None (the probe's
        'the server does not take this field')."""
        import openai

        cfg = self.cfg
        try:
            return self.client.chat.completions.create(model=cfg.model, messages=messages, stream=stream, **sampling)
        except openai.APIStatusError as e:
            if e.status_code in tolerate:
                return None
            if e.status_code < 500 and e.status_code not in RETRY_STATUS:
                hint = f"; it serves {', '.join(self.served[:5])}" if self.served and cfg.model not in self.served else ""
                if e.status_code == 404 and not hint and not self.url.endswith("/v1"):
                    hint = "; OpenAI-compatible servers usually answer under /v1 (--judge-url http://HOST:PORT/v1)"
                raise RouteSAEError(f"the judge at {self.url} refused the request (HTTP {e.status_code}): "
                                    f"{_status_detail(e)}{hint}") from None
            error: Exception = e
        except openai.APIConnectionError as e:  # timeouts included
            error = e
        raise RouteSAEError(f"the judge at {self.url} failed {_times(_attempts(error, cfg.max_retries + 1))}, "
                            f"last: {_first_line(error)}; rerun to resume (answered requests are cached)")

    def _plain(self, messages: Messages, sampling: dict[str, Any], tolerate: tuple[int, ...] = ()) -> dict[str, Any] | None:
        """One reply, not streamed, as a plain JSON object (logprobs come whole with it)."""
        reply = self._open(messages, sampling, stream=False, tolerate=tolerate)
        if reply is None:
            return None
        dump = getattr(reply, "model_dump", None)
        return dump() if callable(dump) else reply if isinstance(reply, dict) else {}

    def _tokenizer(self) -> Any:
        """The judge's tokenizer for logit_bias: --judge-tokenizer, else the model name when it is a
        folder (`transformers serve FOLDER` serves the model under its folder's path), loaded once."""
        with self._tok_lock:
            if self._tok is None:
                name = self.cfg.tokenizer or self.cfg.model
                if self.cfg.tokenizer is None and not Path(name).expanduser().is_dir():
                    raise RouteSAEError(f"logit_bias needs the judge's token ids, and the model name {name!r} is no "
                                        "tokenizer folder: pass --judge-tokenizer (the served model's folder or hub "
                                        "name), or --judge-mode json_schema, logprobs or free")
                from transformers import AutoTokenizer

                try:
                    self._tok = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if
                                                              Path(name).expanduser().is_dir() else name)
                except Exception as e:  # noqa: BLE001 - any failure to load it is told the same way
                    raise RouteSAEError(f"logit_bias needs the judge's token ids, and {name!r} gave no tokenizer "
                                        f"({_first_line(e)}); pass --judge-tokenizer (the served model's folder "
                                        "or hub name), or --judge-mode json_schema, logprobs or free") from None
            return self._tok

    def answer_ids(self, choices: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
        return answer_token_ids(self._tokenizer(), choices, self.cfg.tokenizer or self.cfg.model)

    def probe(self) -> dict[str, Any]:
        # One plain request asks for both a JSON schema and logprobs: a server that honours either
        # shows it in its reply; servers that ignore them (transformers serve) answer as usual, and
        # one that rejects the fields (HTTP 400 or 422) honours neither.
        found: dict[str, Any] = {"json_schema": False, "logprobs": False, "logit_bias": None, "note": None}
        data = self._plain(PROBE_MESSAGES, {"temperature": 0.0, "max_tokens": 16, "response_format": PROBE_FORMAT,
                                            "logprobs": True, "top_logprobs": TOP_LOGPROBS}, tolerate=(400, 422))
        if data is None:  # refused the pair: perhaps only logprobs, so the schema alone
            data = self._plain(PROBE_MESSAGES, {"temperature": 0.0, "max_tokens": 16, "response_format": PROBE_FORMAT},
                               tolerate=(400, 422))
        if data is not None:
            try:
                answer = json.loads(_choice_text(data).strip())
            except ValueError:
                answer = None
            found["json_schema"] = isinstance(answer, dict) and answer.get("answer") in ("yes", "no")
            found["logprobs"] = bool(_top_logprobs(data))
        if found["json_schema"] or found["logprobs"]:
            return found
        try:
            ids = self.answer_ids([PROBE_FORCED])[PROBE_FORCED]
        except RouteSAEError as e:
            found["note"] = str(e)
            return found
        data = self._plain(PROBE_MESSAGES, {"temperature": 0.0, "max_tokens": 1,
                                            "logit_bias": {str(i): BIAS for i in ids}}, tolerate=(400, 422))
        found["logit_bias"] = data is not None and _choice_text(data).strip() == PROBE_FORCED
        return found

    def _read(self, stream: Any, received: Received) -> str:
        """The reply's text, piece by piece; a server that answers a streamed request with one plain
        JSON reply instead is read as such."""
        response = getattr(stream, "response", None)
        kind = response.headers.get("content-type", "") if response is not None else "text/event-stream"
        if "text/event-stream" not in kind:
            try:
                return _choice_text(json.loads(response.read()))
            except ValueError:
                raise RouteSAEError(f"the judge at {self.url} answered a chat request with "
                                    f"{kind or 'no content-type'}, neither a stream nor JSON: is --judge-url an "
                                    "OpenAI-compatible server?") from None
        pieces: list[str] = []
        for chunk in stream:
            choices = getattr(chunk, "choices", None) or []
            delta = getattr(choices[0], "delta", None) if choices else None
            text = getattr(delta, "content", None)
            if text:
                pieces.append(text)
                received(1)
        return "".join(pieces)

    def complete(self, messages: Messages, sampling: dict[str, Any], received: Received) -> str:
        cfg = self.cfg
        params = dict(sampling)
        answer = params.pop("answer", None)
        if answer is not None:
            params["max_tokens"] = 1
            if answer["how"] == "logprobs":
                data = self._plain(messages, {**params, "logprobs": True, "top_logprobs": TOP_LOGPROBS}) or {}
                received(1)
                return json.dumps({"content": _choice_text(data), "top_logprobs": _top_logprobs(data)})
            # logit_bias: every spelling of every answer raised by so much that no other token can win
            ids = self.answer_ids(answer["choices"])
            params["logit_bias"] = {str(i): BIAS for c in answer["choices"] for i in ids[c]}
        broken = _stream_errors()
        for attempt in range(cfg.max_retries + 1):
            stream = self._open(messages, params)
            try:
                return self._read(stream, received)
            except broken as e:
                error: BaseException = e
            finally:
                stream.close()
            if attempt == cfg.max_retries:
                raise RouteSAEError(f"the judge at {self.url} broke off its reply {_times(attempt + 1)}, last: "
                                    f"{_first_line(error)}; rerun to resume (answered requests are cached)")
            # Exponential backoff with jitter, so parallel workers do not retry in lockstep.
            time.sleep(min(cfg.retry_cap, cfg.retry_base * 2 ** attempt) * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")


class _TokenCounter:
    """A `generate` streamer (duck-typed: put, end) that tells `received` of each new token; its
    first put is the prompt, not counted."""

    def __init__(self, received: Received):
        self.received = received
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.received(int(value.numel()))

    def end(self) -> None:
        pass


class LocalBackend:
    """A transformers chat model in this process: chat template, then greedy (or sampled) generate."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.spec = cfg.model[len(LOCAL_PREFIX):]
        self._loaded: Any = None
        self._lock = threading.Lock()

    def check(self) -> None:
        from routesae.model.loading import load_model

        with self._lock:
            if self._loaded is None:
                self._loaded = load_model(self.spec, "float32", "auto")
                if not getattr(self._loaded.tokenizer, "chat_template", None):
                    raise RouteSAEError(f"{self.spec} has no chat template: a judge must be a chat model")

    def complete(self, messages: Messages, sampling: dict[str, Any], received: Received) -> str:
        import torch

        self.check()
        model, tok = self._loaded.model, self._loaded.tokenizer
        counter = _TokenCounter(received)
        with self._lock:  # one generate at a time: the threads only queue here
            inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True).to(model.device)
            answer = sampling.get("answer")
            if answer is not None:
                return self._choose(inputs, answer["choices"], received)
            temperature = float(sampling["temperature"])
            gen = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=int(sampling["max_tokens"]),
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                     top_p=None, top_k=None, streamer=counter, **gen)
            return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def probe(self) -> dict[str, Any]:
        return {"json_schema": False, "logprobs": False, "logit_bias": None, "note": "in-process: constrained"}

    def _choose(self, inputs: Any, choices: list[str], received: Received) -> str:
        """Constrained decoding of a one-token answer: one forward pass, and the answer whose
        spellings carry the most probability at the reply's first position. The reply lists every
        spelling's log-probability (over the whole vocabulary), as protocols.parse_choice reads it."""
        import torch

        tok = self._loaded.tokenizer
        ids = answer_token_ids(tok, choices, self.spec)
        with torch.no_grad():
            logits = self._loaded.model(**inputs).logits[0, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        best = max(choices, key=lambda c: float(torch.logsumexp(logp[ids[c]], dim=0)))
        received(1)
        return json.dumps({"content": best, "top_logprobs": [[tok.decode([i]), float(logp[i])]
                                                             for c in choices for i in ids[c]]})


class Progress:
    """What a person sees of one batch of requests: a bar of requests answered, and under it a bar
    of reply tokens received, which moves while a long request is still under way."""

    def __init__(self, desc: str, total: int, enabled: bool):
        self.requests = tqdm(total=total, desc=desc, unit="req", disable=not enabled, dynamic_ncols=True)
        self.tokens = tqdm(desc="  reply tokens received", unit="tok", disable=not enabled, dynamic_ncols=True)
        self._lock = threading.Lock()  # workers report at once; tqdm's counters are not atomic

    def received(self, n: int) -> None:
        with self._lock:
            self.tokens.update(n)

    def answered(self) -> None:
        with self._lock:
            self.requests.update(1)

    def close(self) -> None:
        self.tokens.close()
        self.requests.close()


class Judge:
    """Asks a backend many conversations at once: cached replies first, the rest `concurrency` at a
    time. The backend's first look (`check`) happens before the first request it really has to
    answer, so a fully cached rerun needs no server."""

    def __init__(self, cfg: JudgeConfig, backend: Backend | None = None):
        if cfg.concurrency < 1:
            raise RouteSAEError("--concurrency must be at least 1")
        if cfg.max_retries < 0:
            raise RouteSAEError("--max-retries must not be negative")
        if cfg.max_tokens < 1:
            raise RouteSAEError("--max-tokens must be at least 1")
        if not cfg.temperature >= 0:
            raise RouteSAEError("--temperature must be a non-negative number")
        if not cfg.timeout > 0:
            raise RouteSAEError("--timeout must be a positive number of seconds")
        if not cfg.local and not cfg.url:
            raise RouteSAEError("pass --judge-url (an OpenAI-compatible server), or --judge-model local:PATH")
        if cfg.mode not in JUDGE_MODES:
            raise RouteSAEError(f"--judge-mode {cfg.mode!r}: use one of {', '.join(JUDGE_MODES)}")
        if cfg.local and cfg.mode not in ("auto", *LOCAL_MODES):
            raise RouteSAEError(f"--judge-mode {cfg.mode} asks a server; a local: judge runs constrained (auto) or free")
        if not cfg.local and cfg.mode == "constrained":
            raise RouteSAEError("--judge-mode constrained runs a local: judge; a server is made to answer by "
                                "json_schema, logprobs or logit_bias (auto picks)")
        self.cfg = cfg
        self.backend = backend or (LocalBackend(cfg) if cfg.local else OpenAIBackend(cfg))
        self.cache = ReplyCache(cfg.cache_dir) if cfg.cache_dir is not None else None
        self.requests = 0
        """Replies the backend produced (not from the cache) in this process."""
        self.cached = 0
        """Replies read from the cache."""
        self._checked = False
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """The model as the cache key names it: a local path made absolute, a served name as given."""
        if self.cfg.local:
            spec = self.cfg.model[len(LOCAL_PREFIX):]
            return LOCAL_PREFIX + (str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().exists() else spec)
        return self.cfg.model

    def _ensure_checked(self) -> None:
        with self._lock:
            if not self._checked:
                self.backend.check()
                self._checked = True

    def resolve_mode(self) -> "ModeChoice":
        """The mode this run uses: --judge-mode as given, or (auto) constrained for a local: judge and,
        for a server, what one probe finds it honours, best first: logprobs (with a JSON schema),
        json_schema, logprobs alone, logit_bias, free. The probe's findings are cached like a reply,
        so a rerun asks nothing."""
        cfg = self.cfg
        if cfg.mode != "auto":
            answer_ids = getattr(self.backend, "answer_ids", None)
            if cfg.mode == "logit_bias" and answer_ids is not None:
                answer_ids(["0", "1"])  # no tokenizer to be had: said now, before any request
            return ModeChoice(cfg.mode, None, "as --judge-mode asked")
        if cfg.local:
            return ModeChoice("constrained", None, "a local: judge picks among the answers' logits")
        sampling = {"probe": PROBE_VERSION, "tokenizer": cfg.tokenizer}
        key = cache_key(self.model_id, PROBE_MESSAGES, sampling)
        cached = self.cache.get(key) if self.cache is not None else None
        try:
            found = json.loads(cached) if cached is not None else None
        except ValueError:
            found = None
        if isinstance(found, dict):
            self.cached += 1
        else:
            self._ensure_checked()
            found = self.backend.probe()
            if self.cache is not None:
                self.cache.put(key, self.model_id, sampling, json.dumps(found, sort_keys=True))
            self.requests += 1
        mode, why = _pick(found)
        return ModeChoice(mode, found, why)

    def _ask(self, messages: Messages, key: str, sampling: dict[str, Any], failed: threading.Event,
             progress: Progress) -> str | None:
        """One request; None without asking once another request of the batch has failed (the pool
        may start a queued request before the failure stops the batch)."""
        if failed.is_set():
            return None
        self._ensure_checked()
        try:
            reply = self.backend.complete(messages, sampling, progress.received)
        except BaseException:
            failed.set()
            raise
        if self.cache is not None:
            self.cache.put(key, self.model_id, sampling, reply)
        with self._lock:
            self.requests += 1
        return reply

    def ask_many(self, conversations: list[Messages], desc: str = "judge", progress: bool = True,
                 extras: list[dict[str, Any]] | None = None) -> list[str]:
        """Replies to every conversation, in order. extras: per conversation, what its request adds
        to the sampling settings (`response_format`, `answer`; see Backend.complete), part of its
        cache key."""
        samplings = [{**self.cfg.sampling(), **(extras[i] if extras else {})} for i in range(len(conversations))]
        keys = [cache_key(self.model_id, m, s) for m, s in zip(conversations, samplings)]
        replies: list[str | None] = [self.cache.get(k) if self.cache is not None else None for k in keys]
        todo = [i for i, r in enumerate(replies) if r is None]
        self.cached += len(conversations) - len(todo)
        if not todo:
            return replies  # type: ignore[return-value]
        if progress and self.cfg.local and not self._checked:
            tqdm.write(f"loading the judge {self.cfg.model[len(LOCAL_PREFIX):]} ...", file=sys.stderr)
        self._ensure_checked()  # a server that does not answer says so before any progress bar
        if progress:
            cached = len(conversations) - len(todo)
            tqdm.write(f"{desc}: {len(todo)} request{'s' if len(todo) != 1 else ''} to {self.cfg.describe()}"
                       + (f" ({cached} more answered from the cache)" if cached else ""), file=sys.stderr)
        bars = Progress(desc, len(todo), progress)
        pool = ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(todo)))
        try:
            failed = threading.Event()
            futures = {pool.submit(self._ask, conversations[i], keys[i], samplings[i], failed, bars): i for i in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                # a failed request raises here and stops the rest (its error first, not a skipped one's)
                for f in sorted(done, key=lambda f: f.exception() is None):
                    replies[futures[f]] = f.result()
                    bars.answered()
        finally:
            # On an error or Ctrl-C: drop what has not started; requests in flight finish and are cached.
            pool.shutdown(wait=False, cancel_futures=True)
            bars.close()
        return replies  # type: ignore[return-value]


class ModeChoice(NamedTuple):
    """The mode a run uses, and why."""

    mode: str
    found: dict[str, Any] | None
    """What the probe found the server honours (None: no probe ran)."""
    why: str


def _pick(found: dict[str, Any]) -> tuple[str, str]:
    """The best mode a probe's findings allow, and why, in words."""
    if found.get("logprobs") and found.get("json_schema"):
        return "logprobs", "the server honours response_format and logprobs"
    if found.get("json_schema"):
        return "json_schema", "the server honours response_format, not logprobs"
    if found.get("logprobs"):
        return "logprobs", "the server honours logprobs, not response_format (paper replies read as free text)"
    if found.get("logit_bias"):
        return "logit_bias", "the server ignores response_format and logprobs, honours logit_bias"
    if found.get("logit_bias") is False:
        return "free", "the server honours none of response_format, logprobs and logit_bias"
    return "free", ("the server ignores response_format and logprobs, and logit_bias was not tried: "
                    + str(found.get("note") or "no tokenizer"))
