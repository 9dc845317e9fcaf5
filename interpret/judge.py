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
from typing import Any, Callable, Protocol

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
        """One reply, telling `received` of its tokens as they come; RouteSAEError when it cannot be had."""


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

    def _open(self, messages: Messages, sampling: dict[str, Any]) -> Any:
        """The streamed reply's start; the client retries until it has one or gives up."""
        import openai

        cfg = self.cfg
        try:
            return self.client.chat.completions.create(model=cfg.model, messages=messages, stream=True, **sampling)
        except openai.APIStatusError as e:
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
        broken = _stream_errors()
        for attempt in range(cfg.max_retries + 1):
            stream = self._open(messages, sampling)
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
            temperature = float(sampling["temperature"])
            gen = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=int(sampling["max_tokens"]),
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                     top_p=None, top_k=None, streamer=counter, **gen)
            return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


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

    def _ask(self, messages: Messages, key: str, failed: threading.Event, progress: Progress) -> str | None:
        """One request; None without asking once another request of the batch has failed (the pool
        may start a queued request before the failure stops the batch)."""
        if failed.is_set():
            return None
        self._ensure_checked()
        sampling = self.cfg.sampling()
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

    def ask_many(self, conversations: list[Messages], desc: str = "judge", progress: bool = True) -> list[str]:
        """Replies to every conversation, in order."""
        sampling = self.cfg.sampling()
        keys = [cache_key(self.model_id, m, sampling) for m in conversations]
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
            futures = {pool.submit(self._ask, conversations[i], keys[i], failed, bars): i for i in todo}
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
