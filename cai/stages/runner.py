"""The one loop that moves rows through a stage, for every command and the Python API.

``run_stage`` streams a stage's input, skips the rows its output already holds (resume by id),
hands the rest to the stage's ``process`` function a chunk at a time (up to ``depth`` chunks in
flight, for backends that take concurrent calls), writes each outcome crash-safely in input
order, and, when asked, prunes rows whose id is no longer among the inputs.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..backends.base import Backend
from ..constitution import Constitution
from ..hashing import sha256_json
from ..output import JsonlSink, SinkSummary
from ..progress import StageProgress
from ..templates import Templates

R = TypeVar("R")


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


Process = Callable[[list[R]], list[Outcome]]


@dataclass
class Feed(Generic[R]):
    """What a stage's input may ask of the run while it streams: whether an id is already
    written, and (for inputs that skip work before yielding, like sampled pairs) which ids it
    skipped, so that they count as done and are kept."""

    sink: JsonlSink
    bar: StageProgress
    seen: set[str] = field(default_factory=set)

    def is_done(self, row_id: str) -> bool:
        return self.sink.is_done(row_id)

    def skipped(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        self.seen.update(ids)
        self.bar.advance(rows=len(ids))


Items = Iterable[R] | Callable[[Feed[R]], Iterable[R]]


def run_stage(path: Path, fingerprint: str, items: Items[R], process: Process[R], *, title: str,
              total: int | None = None, chunk_size: int = 256, depth: int = 1,
              progress: bool | None = None, prune: bool = False) -> SinkSummary:
    """Run (or resume) one stage into ``path``; return its summary.

    ``items`` is the stage's input, or a function of the ``Feed`` that yields it. ``depth`` > 1
    keeps that many chunks in flight (render the next while one waits on the server); chunks
    are still written whole and in input order. With ``prune``, rows of an earlier run whose
    id this run's input no longer has are dropped (``summary.dropped``), so that the output
    holds one row per input row.
    """
    with JsonlSink(path, fingerprint) as sink, StageProgress(title, total, enabled=progress) as bar:
        feed: Feed[R] = Feed(sink, bar)
        stream = items(feed) if callable(items) else items

        def todo() -> Iterator[R]:
            for r in stream:
                rid = getattr(r, "id")  # noqa: B009 - rows and pairs both carry .id
                feed.seen.add(rid)
                if sink.is_done(rid):
                    bar.advance(rows=1)
                else:
                    yield r

        def write(chunk: list[R], fut: Future[list[Outcome]]) -> None:
            outcomes = fut.result()
            if len(outcomes) != len(chunk):  # a stage bug, never the user's
                raise RuntimeError(f"stage returned {len(outcomes)} outcomes for {len(chunk)} rows")
            for o in outcomes:
                if o.row is not None:
                    sink.write(o.row)
                else:
                    sink.fail(o.id, o.reason or "unknown failure", **o.info)
            sink.flush()
            bar.advance(rows=len(chunk), tokens=sum(o.tokens for o in outcomes))

        pending: deque[tuple[list[R], Future[list[Outcome]]]] = deque()
        it = todo()
        while chunk := list(islice(it, chunk_size)):
            pending.append((chunk, _in_thread(process, chunk) if depth > 1 else _now(process, chunk)))
            if len(pending) >= depth:
                write(*pending.popleft())
        while pending:
            write(*pending.popleft())
        summary = sink.finish()
        stale = len(sink.done - feed.seen)
    if prune and stale:
        summary.dropped = _prune(path, feed.seen)
    return summary


def _now(fn: Process[R], chunk: list[R]) -> Future[list[Outcome]]:
    fut: Future[list[Outcome]] = Future()
    fut.set_result(fn(chunk))
    return fut


def _in_thread(fn: Process[R], chunk: list[R]) -> Future[list[Outcome]]:
    """``fn(chunk)`` in a daemon thread (a Ctrl-C or a kill never waits for it)."""
    fut: Future[list[Outcome]] = Future()

    def work() -> None:
        try:
            fut.set_result(fn(chunk))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            fut.set_exception(e)

    threading.Thread(target=work, daemon=True).start()
    return fut


def _prune(path: Path, keep: set[str]) -> int:
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
