"""One async micro-batcher for the backends that compute in this process (embedded, fake).

``generate(request)`` queues the request and awaits its answer; one drain task (on the run's
loop) takes every queued request, at most ``max_batch``, and answers them with one call of the
backend's synchronous ``compute(batch)``, run in the loop's default executor so the loop stays
free. A failing ``compute`` fails its batch's requests (``request`` failures), not the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

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
        if self._drain is not None and not self._drain.done():
            self._drain.cancel()
            await asyncio.gather(self._drain, return_exceptions=True)
        for _, fut in self._queue:
            fut.cancel()
        self._queue.clear()
