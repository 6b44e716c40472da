"""The loop every stage shares: stream rows, skip the finished ones, process a chunk, write it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Generic, TypeVar

from .backends.base import Backend
from .constitution import Constitution, sha256_json
from .output import JsonlSink, SinkSummary
from .progress import StageProgress
from .templates import Templates

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


@dataclass
class StageRun(Generic[R]):
    sink: JsonlSink
    process: Callable[[list[R]], list[Outcome]]
    key: Callable[[R], str]
    chunk_size: int = 256

    def run(self, rows: Iterable[R], progress: StageProgress) -> SinkSummary:
        todo = (r for r in rows if not self._skip(r, progress))
        for chunk in _chunks(todo, self.chunk_size):
            outcomes = self.process(chunk)
            if len(outcomes) != len(chunk):  # a stage bug, never the user's
                raise RuntimeError(f"stage returned {len(outcomes)} outcomes for {len(chunk)} rows")
            for o in outcomes:
                if o.row is not None:
                    self.sink.write(o.row)
                else:
                    self.sink.fail(o.id, o.reason or "unknown failure", **o.info)
            self.sink.flush()
            progress.advance(rows=len(chunk), tokens=sum(o.tokens for o in outcomes))
        return self.sink.finish()

    def _skip(self, row: R, progress: StageProgress) -> bool:
        if self.sink.is_done(self.key(row)):
            progress.advance(rows=1)
            return True
        return False


def _chunks(it: Iterable[R], n: int) -> Iterator[list[R]]:
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk
