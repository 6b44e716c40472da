"""Batch mode's common part: requests gathered into waves, and the Batch-API line format.

A ``WaveBackend`` answers ``generate(request)`` later: the request waits (its ``custom_id`` is the
call cache's key of the request) until no new request arrived for ``quiet`` seconds (at most
``GATHER`` quiet periods after the oldest, for requests that trickle in), or the wave holds
``max_requests``; the wave then goes out as one unit (a batch of the server's Batch API,
``batch_api.py``; a file for the user to run, ``batch_files.py``). The runner lets every row be in
flight, and each row's chain (answer, critique, revision, judge) awaits its steps one by one, so
the waves are the steps: the answers of every row, then the critiques, ...

The line format is OpenAI's (and ``vllm run-batch``'s): a request is ``{"custom_id", "method":
"POST", "url": "/v1/chat/completions", "body"}`` with the body the streaming client would send
(``dialect.build_body``); an answer is ``{"custom_id", "response": {"status_code", "body"},
"error"}``. A line whose error says the batch expired or was cancelled is *missing* (asked again
in a later wave); another error is the request's failure (4xx) or the server's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..types import Completion, Failure, FailureKind, Request
from .dialect import Learned, build_body, parse_response

ENDPOINT = "/v1/chat/completions"
GATHER = 60  # a wave waits at most this many quiet periods for more requests
MISSING_CODES = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})


@dataclass
class BatchState:
    """What progress shows of one batch: its state and counts, and when either last changed."""

    name: str
    status: str
    done: int = 0
    total: int = 0
    failed: int = 0
    batch_id: str = ""
    changed: float = field(default_factory=time.monotonic)

    def line(self, counts: bool = True) -> str:
        """``wave 2 (batch_abc) finalizing 0:03:10, 4,812/5,000``: the time since the last change
        (without the counts and the name: what a progress bar beside them says)."""
        s = int(time.monotonic() - self.changed)
        ident = f"({self.batch_id}) " if self.batch_id else ""
        failed = f", {self.failed:,} failed" if self.failed else ""
        text = f"{ident}{self.status} {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
        return f"{self.name} {text}, {self.done:,}/{self.total:,}{failed}" if counts else text + failed

    def update(self, status: str, done: int, total: int, failed: int) -> bool:
        """Take the server's figures; True (and ``changed`` reset) when they differ."""
        if (status, done, total, failed) == (self.status, self.done, self.total, self.failed):
            return False
        self.status, self.done, self.total, self.failed = status, done, total, failed
        self.changed = time.monotonic()
        return True


def read_answer(line: dict[str, Any], req: Request, learned: Learned, model: str,
                extra_body: dict[str, Any] | None) -> Completion | None:
    """One output line as the request's ``Completion`` (a failure for an error line); ``None``
    when the line says the request was never run (its batch expired or was cancelled)."""
    resp = line.get("response") or {}
    err = line.get("error") or {}
    status, body = resp.get("status_code"), resp.get("body")
    if status == 200 and isinstance(body, dict):
        sent, mode = build_body(req, model, extra_body, learned.dialect())
        c = parse_response(body)
        if c.failure is not None:
            return c
        learned.fit(req, sent, mode, c)  # a greedy request's missing samples copied
        if len(c.texts) < req.sampling.n:
            return Completion.failed("server", f"the batch answered {len(c.texts)} of {req.sampling.n} samples")
        return c
    code = str(err.get("code") or "") if isinstance(err, dict) else ""
    if code in MISSING_CODES:
        return None
    message = _message(body) or (_message(err) or code if isinstance(err, dict) else str(err or ""))
    if isinstance(status, int):
        kind: FailureKind = "request" if 400 <= status < 500 and status != 429 else "server"
        return Completion.failed(kind, f"HTTP {status}: {message}"[:600])
    return Completion.failed("server", f"batch line error: {message or 'no answer'}"[:600])


def _message(body: Any) -> str:
    if isinstance(body, dict):
        e = body.get("error", body)
        return " ".join(str(e.get("message", e) if isinstance(e, dict) else e).split())
    return ""


class WaveBackend:
    """Requests gathered into waves; a subclass sends a wave (``_send``) and answers it
    (``_resolve``). ``max_in_flight`` is the runner's hint: every row may be in flight."""

    def __init__(self, model: str, key: Callable[[str, Request], str], *, server: str = "auto",
                 extra_body: dict[str, Any] | None = None, max_requests: int = 50_000, quiet: float = 1.0) -> None:
        self.model_id, self.key = model, key  # key: the call cache's ``request_key`` (cai.cache)
        self.learned = Learned(server)
        self.extra_body = dict(extra_body) if extra_body else None
        self.max_requests, self.quiet = max(1, max_requests), quiet
        self.max_in_flight = self.max_requests
        self.batches: dict[str, BatchState] = {}  # progress: each batch's state
        self._watchers: list[Callable[[BatchState], None]] = []
        self._asked: dict[str, Request] = {}  # custom_id -> the request waiting for it
        self._waiting: dict[str, asyncio.Future[Completion]] = {}
        self._pending: dict[str, Request] = {}  # waiting for the next wave
        self._last = self._oldest = 0.0  # when the last request came, and the oldest still waiting
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self.sent = self.waves = 0
        self.where: dict[str, str] = {}  # where the subclass keeps the waves, for describe()

    # ------------------------------------------------------------------------ the contract
    def body(self, req: Request) -> dict[str, Any]:
        return build_body(req, self.model_id, self.extra_body, self.learned.dialect())[0]

    def line(self, custom_id: str, req: Request) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": self.body(req)}

    async def generate(self, request: Request) -> Completion:
        key = self.key(self.model_id, request)
        known = await self._known(key, request)
        if known is not None:
            return known
        fut = self._waiting.get(key)
        if fut is None:
            fut = self._waiting[key] = asyncio.get_running_loop().create_future()
            self._asked[key] = request
            await self._enqueue(key, request)
        return await asyncio.shield(fut)

    async def aclose(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        return {"batch": {"waves": self.waves, "requests_sent": self.sent,
                          "batches": {k: {"status": b.status, "done": b.done, "total": b.total, "failed": b.failed}
                                      for k, b in self.batches.items()}, **self.where}}

    def watch(self, fn: Callable[[BatchState], None]) -> None:
        """``fn(state)`` on every change of a batch's state or counts (the progress display)."""
        self._watchers.append(fn)
        for b in self.batches.values():
            fn(b)

    def changed(self, state: BatchState) -> None:
        self.batches[state.name] = state
        for fn in self._watchers:
            fn(state)

    # ----------------------------------------------------------------------------- subclass
    async def _known(self, key: str, req: Request) -> Completion | None:
        """An answer held already (read from an earlier wave), else None."""
        return None

    async def _enqueue(self, key: str, req: Request) -> None:
        self.queue(key, req)

    async def _send(self, wave: dict[str, Request]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------- waves
    def queue(self, key: str, req: Request) -> None:
        """``key`` goes into the next wave; the wave goes out once the requests stop coming."""
        self._last = time.monotonic()
        if not self._pending:
            self._oldest = self._last
        self._pending[key] = req
        if self._flusher is None or self._flusher.done():
            self._flusher = self.spawn(self._flush())

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush(self) -> None:
        while self._pending:
            wait = self.due() - time.monotonic()
            if wait > 0 and len(self._pending) < self.max_requests:
                await asyncio.sleep(wait)
                continue
            await self._send({k: self._pending.pop(k) for k in list(self._pending)[: self.max_requests]})

    def due(self) -> float:
        """When the waiting requests go: once none came for ``quiet`` seconds, and at the latest
        ``GATHER`` quiet periods after the oldest came (requests that trickle in forever)."""
        return min(self._last + self.quiet, self._oldest + GATHER * self.quiet)

    def settle(self, keys: Any, outcome: Completion | Failure | BaseException) -> None:
        """Each waiting request of ``keys`` gets ``outcome``: a ``Completion`` or a ``Failure`` is its
        answer; an exception (a ``BackendError``: the run cannot go on) is raised to it."""
        for k in list(keys):
            fut = self._waiting.pop(k, None)
            self._asked.pop(k, None)
            if fut is None or fut.done():
                continue
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
                fut.exception()  # retrieved: the row may be gone
            else:
                fut.set_result(Completion([], failure=outcome) if isinstance(outcome, Failure) else outcome)
