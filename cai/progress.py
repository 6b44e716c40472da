"""Progress for long jobs: per stage, rows done of the total, rows/s, requests in flight,
generated and prompt tokens/s (apart: prefill is cheap, decoding is what the engine spends),
elapsed time and ETA. It moves on every model call, not per batch. Quiet when disabled.

Off a terminal (a log file, CI, nohup) and not told either way, there are no bars but one plain
line every ``PLAIN_EVERY_S`` seconds: each stage's rows done of the total, calls, tokens/s, ETA."""

from __future__ import annotations

import math
import sys
import threading
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        f, elapsed = task.fields, task.elapsed or math.inf  # not started: every rate is 0
        if (batch := f.get("batch")) is not None:  # a batch: its state, and how long since it last changed
            return Text(batch.line(counts=False), style="progress.data.speed")
        return Text(f"{task.completed / elapsed:,.2f} rows/s  {f.get('in_flight', 0)} in flight  "
                    f"gen {f.get('gen', 0) / elapsed:,.0f} tok/s  prompt {f.get('prompt', 0) / elapsed:,.0f} tok/s",
                    style="progress.data.speed")


ENDED = frozenset({"completed", "expired", "cancelled", "failed", "abandoned", "lost"})  # a batch's last states
PLAIN_EVERY_S = 30.0  # seconds between two plain progress lines (off a terminal)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class PlainLines:
    """A thread printing one line on stderr every ``interval`` seconds while started: for each
    stage of ``progress``, ``title done/total rows, N calls, gen T tok/s, ETA h:mm:ss``."""

    def __init__(self, progress: Progress, interval: float) -> None:
        self.progress, self.interval = progress, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    def start(self) -> None:
        self._stop.clear()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="cai-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        parts = []
        for task in list(self.progress.tasks):
            if (batch := task.fields.get("batch")) is not None:
                parts.append(batch.line())
                continue
            done, total, elapsed, f = int(task.completed), task.total, task.elapsed or 0.0, task.fields
            rate = f.get("gen", 0) / elapsed if elapsed > 0 else 0.0
            eta = "?" if total is None or not done else _clock(max(0.0, total - done) * elapsed / done)
            parts.append(f"{task.description} {done}/{'?' if total is None else int(total)} rows, "
                         f"{f.get('calls', 0)} calls, gen {rate:,.0f} tok/s, ETA {eta}")
        return f"progress {_clock(time.monotonic() - self._t0)}: " + "; ".join(parts)


class RunProgress:
    """One live display for a run; each stage adds its bar with ``stage(title, total)``. Off a
    terminal, unless ``enabled`` says otherwise, plain lines every ``interval`` s (``PlainLines``)."""

    def __init__(self, *, enabled: bool | None = None, interval: float | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not self.enabled, transient=False,
        )
        self._plain = (PlainLines(self._progress, PLAIN_EVERY_S if interval is None else interval)
                       if enabled is None and not self.enabled else None)
        # whether anything shows the bars' state (the bars, or the plain lines that read them):
        # when nothing does, the per-call updates skip rich (a lock and a dict per call)
        self.shown = self.enabled or self._plain is not None
        self._open = 0
        self.dropped: dict[str, int] = {}  # per stage: rows it will not process after all
        self._stages: dict[str, StageProgress] = {}
        self._batches: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def stage(self, description: str, total: int | None) -> StageProgress:
        return StageProgress(description, total, self)

    def drop(self, description: str, rows: int) -> None:
        """``rows`` of a stage's total will not be processed after all (a gate skipped them, a
        revision failed before it could be judged): the total shrinks, so a finished bar reads
        N/N. A stage whose bar is not open yet starts with the smaller total."""
        if rows:
            self.dropped[description] = self.dropped.get(description, 0) + rows
            if (bar := self._stages.get(description)) is not None:
                bar.shrink(rows)

    def batch(self, state: Any) -> None:
        """A batch of batch mode changed (a ``cai.backends.waves.BatchState``): its line shows its
        state, counts and the time since the last change; it goes once the batch has ended."""
        with self._lock:
            task = self._batches.get(state.name)
            if state.status in ENDED:
                if task is not None:
                    self._progress.remove_task(self._batches.pop(state.name))
                return
            if task is None:
                self._batches[state.name] = self._progress.add_task(
                    state.name, total=state.total or None, completed=state.done, batch=state)
            else:
                self._progress.update(task, total=state.total or None, completed=state.done, batch=state)

    def _add(self, description: str, total: int | None) -> TaskID:
        if self._open == 0:
            self._progress.start()
            if self._plain is not None:
                self._plain.start()
        self._open += 1
        return self._progress.add_task(description, total=total, gen=0, prompt=0, in_flight=0)

    def _done(self) -> None:
        self._open -= 1
        if self._open == 0:
            self._progress.stop()
            if self._plain is not None:
                self._plain.stop()


class StageProgress:
    """``with StageProgress("revise", total) as p: p.advance(rows); p.called(prompt, gen, in_flight)``."""

    def __init__(self, description: str, total: int | None, group: RunProgress) -> None:
        self.group, self.description, self.total = group, description, total
        self.rows = self.gen_tokens = self.prompt_tokens = self.calls = 0
        self._task: TaskID | None = None

    def advance(self, rows: int = 0) -> None:
        """Rows finished (written, failed or kept from before)."""
        self.rows += rows
        if self._task is not None and self.group.shown:
            self.group._progress.update(self._task, advance=rows)

    def shrink(self, rows: int) -> None:
        if self.total is not None:
            self.total = max(0, self.total - rows)
            if self._task is not None:
                self.group._progress.update(self._task, total=self.total)

    def called(self, prompt_tokens: int, completion_tokens: int, in_flight: int) -> None:
        """One model call returned."""
        self.prompt_tokens += prompt_tokens
        self.gen_tokens += completion_tokens
        self.calls += 1
        if self._task is not None and self.group.shown:
            self.group._progress.update(self._task, gen=self.gen_tokens, prompt=self.prompt_tokens,
                                        in_flight=in_flight, calls=self.calls)

    def __enter__(self) -> StageProgress:
        self.shrink(self.group.dropped.get(self.description, 0))
        self._task = self.group._add(self.description, self.total)
        self.group._stages[self.description] = self
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.group._stages.pop(self.description, None)
        self.group._done()
