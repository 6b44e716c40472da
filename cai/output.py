"""Crash-safe JSONL output for a stage, with resume.

While a stage runs, rows are appended whole to ``NAME.jsonl.part`` (one JSON object a line)
and failures to ``NAME.failures.jsonl.part``. A ``.part`` left by a crash is trimmed to its
last complete line on the next start, and the ids it holds are skipped: that is the resume.
The run's fingerprint (constitution, templates, model, settings) is kept beside it; when it
differs, the old partial output is discarded. ``finish`` makes the files final with an
atomic rename, so that ``NAME.jsonl`` is only ever seen complete. An I/O error while writing
(a full disk) is kept, not raised where it happens (the runner writes from callbacks): the sink
writes nothing more, tells ``on_error`` (the run stops), and ``finish`` raises it, so no final
file is made from a cut ``.part``.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO

from .errors import InputError
from .files import dumps, loads, write_text_atomic

RECENT_ROWS = 1024  # rows kept in memory for ``JsonlSink.read`` (each is read right after it is written)


def _trim_partial_line(path: Path) -> None:
    """Cut a file back to its last newline (a crash may leave half a line)."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb+") as f:
        pos = size
        chunk = 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            nl = buf.rfind(b"\n")
            if nl >= 0:
                f.truncate(start + nl + 1)
                return
            pos = start
        f.truncate(0)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: start the stage afresh


def index_lines(path: Path) -> dict[str, tuple[int, int]]:
    """Each row's id -> (line number from 1, byte offset) in a JSONL file we wrote; an id on two
    lines (two runs wrote here at once) is an ``InputError`` naming the file and both lines."""
    index: dict[str, tuple[int, int]] = {}
    offset = 0
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row_id = loads(line)["id"]
                if row_id in index:
                    raise InputError(f"{path}:{n}: id {row_id!r} again (first on line {index[row_id][0]}): two "
                                     "runs wrote here at once; keep one line per id (or remove the file) and rerun")
                index[row_id] = (n, offset)
            offset += len(line)
    return index


@dataclass
class SinkSummary:
    path: Path
    written: int = 0
    resumed: int = 0
    failed: int = 0
    failures_path: Path | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # rows of an earlier run no longer among the inputs (pruned)
    kept: int = 0  # rows of an earlier run no longer among the inputs, kept (not asked to prune)


class JsonlSink:
    """Rows of one stage, written crash-safely. Use as a context manager, then ``finish()``."""

    def __init__(self, path: str | Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.part = self.path.with_name(self.path.name + ".part")
        self.meta = self.path.with_name(self.path.name + ".meta.json")
        stem = self.path.name[: -len(".jsonl")] if self.path.name.endswith(".jsonl") else self.path.name
        self.failures = self.path.with_name(stem + ".failures.jsonl")
        self.failures_part = self.failures.with_name(self.failures.name + ".part")
        self.fingerprint = fingerprint
        self.summary = SinkSummary(path=self.path)
        self.done: dict[str, tuple[int, int]] = {}  # id -> (line, byte offset) in the .part file
        self._lines = 0
        self._offset = 0
        # The lines written last, by id: ``read`` is asked for a row just written (`cai run`
        # pairs each revision as it is written), which needs no flush, open and seek.
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self.error: OSError | None = None  # the first I/O error writing (a full disk): nothing more is written
        self.on_error: Callable[[OSError], None] | None = None
        self._open()

    def _open(self) -> None:
        meta = _read_meta(self.meta)
        same = meta.get("fingerprint") == self.fingerprint
        self._f: BinaryIO | None = None
        self._fail_f: TextIO | None = None
        self._src = self.part
        if same and meta.get("complete") and self.path.exists():
            # Finished before with the same settings: resume from the final file, which stays
            # final (and run.json's readers undisturbed) until there is a new row to write.
            self._src = self.path
        elif same and self.part.exists():
            _trim_partial_line(self.part)
        else:
            self.part.unlink(missing_ok=True)
        if self._src.exists():
            self.done = index_lines(self._src)
            with self._src.open("rb") as f:
                self._lines = sum(1 for _ in f)
            self._offset = self._src.stat().st_size
        self.failures_part.unlink(missing_ok=True)  # a crash's: this run retries those rows
        if self._src == self.part:
            self._writable()
        self.summary.resumed = len(self.done)

    def _writable(self) -> BinaryIO:
        """The .part file, open for appending (moving a finished output back to it first)."""
        if self._f is None:
            if self._src == self.path:
                os.replace(self.path, self.part)
                self._src = self.part
            write_text_atomic(self.meta, json.dumps({"fingerprint": self.fingerprint, "complete": False}))
            self._f = self.part.open("ab")
        return self._f

    def is_done(self, row_id: str) -> bool:
        return row_id in self.done

    def line_of(self, row_id: str) -> int:
        """The row's line number (from 1) in the output."""
        return self.done[row_id][0]

    def read(self, row_id: str) -> dict[str, Any]:
        """A row written before (this run or an earlier one), read back from the output."""
        line = self._recent.get(row_id)
        if line is not None:
            return loads(line)
        if self._f is not None:
            self._f.flush()
        with self._src.open("rb") as f:
            f.seek(self.done[row_id][1])
            row: dict[str, Any] = loads(f.readline())
        return row

    def _failed(self, e: OSError, path: Path) -> None:
        if self.error is None:
            self.error = OSError(e.errno, e.strerror or str(e), str(path))
            if self.on_error is not None:
                self.on_error(self.error)

    def write(self, row: dict[str, Any]) -> int:
        """Append one row whole; return its line number (0 once writing has failed)."""
        data = (dumps(row) + "\n").encode()
        if self.error is not None:
            return 0
        try:
            self._writable().write(data)
        except OSError as e:
            self._failed(e, self.part)
            return 0
        self._lines += 1
        self.done[row["id"]] = (self._lines, self._offset)
        self._recent[row["id"]] = data
        if len(self._recent) > RECENT_ROWS:
            self._recent.popitem(last=False)  # the oldest
        self._offset += len(data)
        self.summary.written += 1
        return self._lines

    def put(self, outcomes: Iterable[Any]) -> list[int]:
        """A work item's outcomes (``runner.Outcome``): its rows appended (an id written before is left
        as it is), its failures listed; returns the lines its rows are on."""
        lines = []
        for o in outcomes:
            if self.is_done(o.id):
                lines.append(self.line_of(o.id))
            elif o.row is not None:
                lines.append(self.write(o.row))
            else:
                self.fail(o.id, o.reason or "unknown failure", **o.info)
        return lines

    def fail(self, row_id: str, reason: str, **info: Any) -> None:
        try:
            if self._fail_f is None:
                self._fail_f = self.failures_part.open("w", encoding="utf-8")
            self._fail_f.write(dumps({"id": row_id, "reason": reason, **info}) + "\n")
        except OSError as e:
            self._failed(e, self.failures_part)
        key = reason.split(":")[0]
        self.summary.reasons[key] = self.summary.reasons.get(key, 0) + 1
        self.summary.failed += 1

    def _files(self) -> list[IO[Any]]:
        return [f for f in (self._f, self._fail_f) if f is not None and not f.closed]

    def flush(self, durable: bool = True) -> None:
        """Hand what was written to the OS (a killed process loses none of it); with
        ``durable``, also to the disk (a power cut loses none of it)."""
        for f in self._files():
            try:
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            except OSError as e:
                self._failed(e, Path(f.name))

    def finish(self) -> SinkSummary:
        """Make the output final. A rerun that wrote nothing leaves the final file as it was;
        after an I/O error, the error is raised and nothing is made final."""
        self.flush()
        self.close()
        if self.error is not None:
            raise self.error
        if self._src == self.part:
            os.replace(self.part, self.path)
        if self.summary.failed:
            os.replace(self.failures_part, self.failures)
            self.summary.failures_path = self.failures
        else:
            self.failures.unlink(missing_ok=True)
        write_text_atomic(self.meta, json.dumps({"fingerprint": self.fingerprint, "complete": True}))
        return self.summary

    def close(self) -> None:
        for f in self._files():
            try:
                f.close()  # flushes first
            except OSError as e:
                self._failed(e, Path(f.name))

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
