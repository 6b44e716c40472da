"""The one runner that moves rows through a stage, for every command and the Python API.

Each row runs its own chain of model calls (a stage is an async function of one row and a
``Call``); every ready request goes into one bounded pool of ``concurrency`` requests in flight,
so the engine has work while any row has a ready step: there is no per-chunk barrier. Rows are
written as they finish, in input order (a small reorder window, so output files are
deterministic and diffable), appended whole to ``NAME.jsonl.part``; a rerun skips the ids the
output already holds (resume), and, when asked, rows whose id is no longer among the inputs
are pruned at the end.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from .. import runtime
from ..backends.base import Backend, Completion, Request
from ..constitution import Constitution
from ..errors import BackendError
from ..hashing import sha256_json
from ..output import JsonlSink, SinkSummary
from ..progress import RunProgress, StageProgress
from ..templates import Templates

T = TypeVar("T")
R = TypeVar("R")
DURABLE_EVERY_S = 1.0  # fsync the outputs at most this often (a kill loses nothing flushed)


def stage_fingerprint(stage: str, backend: Backend, constitution: Constitution, templates: Templates,
                      template_stages: tuple[str, ...], config: dict[str, Any]) -> str:
    """What a stage's output depends on; an output written under another fingerprint is not resumed."""
    return sha256_json({
        "stage": stage, "model": backend.model_id, "constitution": constitution.digest(),
        "templates": templates.digest(template_stages), "config": config,
    })


@dataclass
class Outcome:
    """What processing one row gave: a row to write, or a failure with its reason."""

    id: str
    row: dict[str, Any] | None = None
    reason: str | None = None
    tokens: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class Pool:
    """The requests in flight, shared by every stream of a run.

    At most ``concurrency`` at once; for a backend that computes here in batches, at most its
    ``max_in_flight`` (an optional hint: more would wait in its queue, not here in row order).
    Waiting requests go out oldest row first: a row's next call overtakes the first calls of
    rows admitted after it, so rows finish (and are written) early, and a server still holds
    the row's earlier turns in its prefix cache.
    """

    def __init__(self, backend: Backend, concurrency: int) -> None:
        self.backend = backend
        self.concurrency = max(1, min(concurrency, getattr(backend, "max_in_flight", None) or concurrency))
        self.in_flight = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._count = itertools.count()

    async def call(self, request: Request, priority: int = 0) -> Completion:
        if self.in_flight >= self.concurrency or self._waiting:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (priority, next(self._count), turn))
            await turn  # the slot is handed over by the call that frees it
        else:
            self.in_flight += 1
        try:
            c = await self.backend.generate(request)
        except BackendError:
            raise
        except Exception as e:  # noqa: BLE001 - a backend bug fails this call, not the run
            return Completion.failed("request", f"{type(e).__name__}: {e}")
        finally:
            self._release()
        if c.failure is not None and c.failure.kind == "unreachable":  # no row can go on
            raise BackendError(c.failure.message)
        return c

    def _release(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():  # not cancelled: the slot passes to it
                turn.set_result(None)
                return
        self.in_flight -= 1


class Call:
    """What a stage's row function uses to ask the model: ``await call(request)`` (or
    ``call.many(requests)``); counts tokens for the progress line. ``priority`` orders waiting
    requests (lower first: the row's position in the input)."""

    def __init__(self, pool: Pool, bar: StageProgress | None = None, priority: int = 0,
                 affinity: str | None = None, stage: str | None = None) -> None:
        self.pool, self.bar, self.priority, self.affinity = pool, bar, priority, affinity
        self.stage = stage  # the stage asking (``Request.stage``: run.json's usage by stage)

    def row(self, priority: int, affinity: str | None = None) -> Call:
        """The calls of one row: its place in the input, and its id (``Request.affinity``)."""
        return Call(self.pool, self.bar, priority, affinity, self.stage)

    async def __call__(self, request: Request) -> Completion:
        if (self.affinity is not None and request.affinity is None) or (
                self.stage is not None and request.stage is None):
            # what dataclasses.replace does, at a fraction of its cost (it inspects the fields)
            request = Request(request.messages, request.sampling, request.affinity or self.affinity,
                              request.step, request.stage or self.stage)
        c = await self.pool.call(request, self.priority)
        if self.bar is not None:
            self.bar.called(c.prompt_tokens, c.completion_tokens, self.pool.in_flight)
        return c

    async def many(self, requests: Iterable[Request]) -> list[Completion]:
        """``gather`` of the calls, without a task for the first: it runs in the caller's task
        (entering the pool first, as gather's first task would), the others as tasks (a judged
        pair's second order: 10-15 us less per pair than gather's two tasks and its future)."""
        reqs = list(requests)
        if not reqs:
            return []
        first, *rest = reqs
        tasks = [asyncio.ensure_future(self(r)) for r in rest]
        try:
            head = await self(first)
            return [head, *[await t for t in tasks]]
        except BaseException as e:
            for t in tasks:  # as gather: cancelled with the caller; otherwise left to finish, retrieved
                if isinstance(e, asyncio.CancelledError):
                    t.cancel()
                t.add_done_callback(_retrieve)
            raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


RowFn = Callable[[T, Call], Awaitable[list[Outcome]]]


@dataclass
class Stream(Generic[T]):
    """One stage's rows: input items, the row function, and the output they are written to.

    ``ids(item)`` names the rows an item yields (one id, or a sampled prompt's pair ids); an
    item whose ids are all written is skipped. ``written(item, lines)`` is told, in input
    order, the output line of each row an item wrote or had written before (``cai run`` feeds
    revisions to the judge this way).
    """

    sink: JsonlSink
    items: Iterable[T] | AsyncIterable[T]
    fn: RowFn[T]
    title: str
    total: int | None = None
    ids: Callable[[T], list[str]] = lambda item: [getattr(item, "id")]  # noqa: B009, E731
    written: Callable[[T, list[int]], None] | None = None
    prune: bool = False
    progress: bool | None = None
    stage: str | None = None  # what run.json's usage calls it (default: the title)


async def _items(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for x in items:
            yield x
    else:
        for x in items:
            yield x


async def run_stream(stream: Stream[T], pool: Pool, *, window: int | None = None,
                     group: RunProgress | None = None) -> SinkSummary:
    """Run one stream to its end (resume, then every remaining row), writing rows in input order.

    At most ``pool.concurrency`` rows are in progress, and at most ``window`` rows (default 4 x
    concurrency) wait for an earlier row before being written.
    """
    sink, seen = stream.sink, set[str]()  # the ids this run's input holds (the rest are pruned when asked)
    window = window or 4 * pool.concurrency
    pending: dict[int, tuple[T, asyncio.Task[list[Outcome]] | None]] = {}
    head = 0  # the next sequence number to write
    active = 0
    wake = asyncio.Event()
    failed: list[BaseException] = []
    last_sync = time.monotonic()
    bars = group or RunProgress(enabled=stream.progress)
    with bars.stage(stream.title, stream.total) as bar:
        call = Call(pool, bar, stage=stream.stage or stream.title)

        def write_ready() -> None:
            nonlocal head, last_sync
            wrote = False
            while head in pending:
                item, task = pending[head]
                if task is not None and not task.done():
                    break
                del pending[head]
                head += 1
                lines = [sink.line_of(i) for i in stream.ids(item) if sink.is_done(i)]
                if task is not None:
                    if task.cancelled() or task.exception() is not None:
                        failed.append(asyncio.CancelledError() if task.cancelled() else task.exception())  # type: ignore[arg-type]
                        continue
                    lines = []
                    for o in task.result():
                        if sink.is_done(o.id):  # an item of several rows, some written before
                            lines.append(sink.line_of(o.id))
                        elif o.row is not None:
                            lines.append(sink.write(o.row))
                        else:
                            sink.fail(o.id, o.reason or "unknown failure", **o.info)
                    wrote = True
                bar.advance(rows=len(stream.ids(item)))
                if stream.written is not None:
                    stream.written(item, [n for n in lines if n is not None])
            if wrote:
                durable = time.monotonic() - last_sync >= DURABLE_EVERY_S
                sink.flush(durable=durable)
                if durable:
                    last_sync = time.monotonic()

        def finished(task: asyncio.Task[list[Outcome]]) -> None:
            nonlocal active
            active -= 1
            if not task.cancelled():
                write_ready()
            wake.set()

        seq = 0
        try:
            async for item in _items(stream.items):
                ids = stream.ids(item)
                seen.update(ids)
                task = None
                if not all(sink.is_done(i) for i in ids):
                    while (active >= pool.concurrency or seq - head >= window) and not failed:
                        wake.clear()
                        await wake.wait()
                    if failed:
                        break
                    task = asyncio.ensure_future(stream.fn(item, call.row(seq, ids[0] if ids else None)))
                    active += 1
                    task.add_done_callback(finished)
                pending[seq] = (item, task)
                seq += 1
                write_ready()
            while active and not failed:
                wake.clear()
                await wake.wait()
            if failed:
                raise failed[0]
        except BaseException:  # a bad input row, a stage bug, a cancel: stop the rows in flight
            tasks = [t for _, t in pending.values() if t is not None and not t.done()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        write_ready()
        summary = sink.finish()
    if stream.prune and len(sink.done) > len(seen & sink.done.keys()):
        summary.dropped = prune(sink.path, seen)
    return summary


def run(coro_fn: Callable[[Pool], Coroutine[Any, Any, R]], backend: Backend, concurrency: int) -> R:
    """Run the runner's coroutine on the run's loop (``cai.runtime``); ``coro_fn`` gets the pool."""
    async def main() -> R:
        return await coro_fn(Pool(backend, concurrency))

    return runtime.run(main())


def run_stage(path: Path, fingerprint: str, items: Iterable[T], fn: RowFn[T], *, backend: Backend, title: str,
              total: int | None = None, concurrency: int = 256, progress: bool | None = None,
              prune: bool = False, ids: Callable[[T], list[str]] | None = None) -> SinkSummary:
    """Run (or resume) one stage into ``path``: ``fn(item, call)`` per item, rows in input order."""
    with JsonlSink(path, fingerprint) as sink:
        stream = Stream(sink, items, fn, title, total, prune=prune, progress=progress)
        if ids is not None:
            stream.ids = ids
        return run(lambda pool: run_stream(stream, pool), backend, concurrency)


def run_rows(items: Iterable[T], fn: RowFn[T], backend: Backend, concurrency: int = 256) -> list[Outcome]:
    """``fn`` over ``items`` with no output file: every outcome, in input order (tests, callers
    that keep rows in memory)."""
    async def go(pool: Pool) -> list[Outcome]:
        call = Call(pool)
        done = await asyncio.gather(*(fn(item, call) for item in items))
        return [o for outs in done for o in outs]

    return run(go, backend, concurrency)


def prune(path: Path, keep: set[str]) -> int:
    """Rewrite ``path`` without the rows whose id is not in ``keep``; return how many went."""
    tmp = path.with_name(path.name + ".tmp")
    dropped = 0
    with path.open(encoding="utf-8") as f, tmp.open("w", encoding="utf-8") as g:
        for line in f:
            if json.loads(line)["id"] in keep:
                g.write(line)
            else:
                dropped += 1
        g.flush()
        os.fsync(g.fileno())
    os.replace(tmp, path)
    return dropped
