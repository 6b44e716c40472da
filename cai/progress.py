"""A rich progress bar for long jobs: rows done, rows/s, tokens/s and ETA."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rows = task.completed / elapsed if elapsed > 0 else 0.0
        toks = task.fields.get("tokens", 0) / elapsed if elapsed > 0 else 0.0
        return Text(f"{rows:,.2f} rows/s  {toks:,.0f} tok/s", style="progress.data.speed")


class StageProgress:
    """``with StageProgress("revise", total) as p: p.advance(rows, tokens)``. Quiet when disabled."""

    def __init__(self, description: str, total: int | None, *, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.tokens = 0
        self.rows = 0
        self.started = time.monotonic()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not self.enabled,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, tokens=0)

    def advance(self, rows: int = 0, tokens: int = 0) -> None:
        self.rows += rows
        self.tokens += tokens
        self._progress.update(self._task, advance=rows, tokens=self.tokens)

    def __enter__(self) -> StageProgress:
        self._progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()
