"""The async batchers of the backends that compute in this process: ``MicroBatcher`` (fake) and
``ContinuousBatcher`` (embedded, below).

``MicroBatcher``: ``generate(request)`` queues the request and awaits its answer; one drain task
(on the run's loop) takes every queued request, at most ``max_batch``, and answers them with one call of the
backend's synchronous ``compute(batch)``, run in the loop's default executor so the loop stays
free. A failing ``compute`` fails its batch's requests (``request`` failures), not the run.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..types import Completion, Request

Compute = Callable[[Sequence[Request]], list[Completion]]


class MicroBatcher:
    def __init__(self, compute: Compute, max_batch: int) -> None:
        self.compute, self.max_batch = compute, max(1, max_batch)
        self._queue: list[tuple[Request, asyncio.Future[Completion]]] = []
        self._drain: asyncio.Task[None] | None = None

    async def generate(self, request: Request) -> Completion:
        fut: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._queue.append((request, fut))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.ensure_future(self._run())
        return await fut

    async def _run(self) -> None:
        while self._queue:
            batch = [(r, f) for r, f in self._queue[: self.max_batch] if not f.done()]
            del self._queue[: self.max_batch]
            if not batch:
                continue
            try:
                done = await asyncio.to_thread(self.compute, [r for r, _ in batch])
            except asyncio.CancelledError:
                for _, fut in batch:
                    fut.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                done = [Completion.failed("request", f"{type(e).__name__}: {e}")] * len(batch)
            if len(done) != len(batch):  # a backend bug; never hand out (or cache) a misaligned answer
                why = f"backend returned {len(done)} completions for {len(batch)} requests"
                done = [Completion.failed("request", why)] * len(batch)
            for (_, fut), c in zip(batch, done, strict=True):
                if not fut.done():
                    fut.set_result(c)

    async def aclose(self) -> None:
        await _shut(self._drain, self._queue)


@dataclass
class Ticket:
    """A queued request as the compute thread sees it: ``resolve`` hands its answer back (once;
    from any thread), ``alive`` is false once its caller gave up."""

    request: Request
    resolve: Callable[[Completion], None]
    alive: Callable[[], bool] = lambda: True


Serve = Callable[[Callable[[], "Ticket | None"]], None]


class ContinuousBatcher:
    """Continuous batching for a backend that decodes step by step in this process.

    ``generate(request)`` queues the request and awaits its answer; while there is work, one drain
    task runs the backend's synchronous ``serve(take)`` in the loop's default executor. ``serve``
    calls ``take()`` between its steps for the next queued request (None when the queue is empty)
    and resolves each ticket the moment its answer is ready, so a caller's next request can be
    queued (and taken) while the others still decode; it returns when it has nothing left. If it
    raises, the requests it took and did not answer fail (``request`` failures), not the run.
    """

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self._queue: deque[tuple[Request, asyncio.Future[Completion]]] = deque()
        self._taken: list[asyncio.Future[Completion]] = []
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    async def generate(self, request: Request) -> Completion:
        self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Completion] = self._loop.create_future()
        self._queue.append((request, fut))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.ensure_future(self._run())
        return await fut

    def _take(self) -> Ticket | None:  # on the compute thread
        loop = self._loop
        while self._queue and not self.closing and loop is not None:
            request, fut = self._queue.popleft()
            if fut.done():  # cancelled while queued
                continue
            self._taken.append(fut)

            def resolve(c: Completion, fut: asyncio.Future[Completion] = fut) -> None:
                loop.call_soon_threadsafe(_settle, fut, c)

            return Ticket(request, resolve, lambda fut=fut: not fut.done())  # type: ignore[misc]
        return None

    async def _run(self) -> None:
        while self._queue and not self.closing:
            try:
                await asyncio.to_thread(self.serve, self._take)
                why = "the backend never answered this request"
            except asyncio.CancelledError:
                self.closing = True
                for fut in self._taken:
                    fut.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                why = f"{type(e).__name__}: {e}"
            for fut in self._taken:  # answers posted before serve returned have been set by now
                _settle(fut, Completion.failed("request", why))
            self._taken.clear()

    async def aclose(self) -> None:
        self.closing = True
        await _shut(self._drain, self._queue)


async def _shut(drain: asyncio.Task[None] | None, queue: Any) -> None:
    """A batcher's close: its drain task stopped, every queued request cancelled."""
    if drain is not None and not drain.done():
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)
    for _, fut in queue:
        fut.cancel()
    queue.clear()


def _settle(fut: asyncio.Future[Completion], c: Completion) -> None:
    if not fut.done():
        fut.set_result(c)
