"""`--batch`: every call as a line of a job of the server's OpenAI Batch API.

A wave (``waves.WaveBackend``) is uploaded as a JSONL file (``POST /files``, purpose ``batch``) and
run as a batch (``POST /batches``, completion window 24h); the batch is polled (``GET
/batches/{id}``) until it ends, its output and error files are downloaded (``GET
/files/{id}/content``) and each line answers its request (``waves.read_answer``).

What must survive a crash lives in ``batches.sqlite`` in the run folder (``BatchStore``): each
wave with its ``custom_id``s before its file is uploaded, the file id once uploaded, the batch id
as soon as the batch is created, and the answers once downloaded. A killed or rerun command polls
the same batches (a wave whose batch was being created is looked up among the server's batches by
its input file) and never sends a request twice: a request that is in a live batch waits for it,
one that was answered is read back. A batch that expired, was cancelled or failed gives what it
answered; its missing requests go into a later wave (at most ``MAX_SUBMITS`` times each).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from ..errors import BackendError
from ..types import Completion, Failure, Request
from .dialect import OPTIONAL_FIELDS, VLLM_FIELDS, refused_fields
from .openai_server import HttpError, ServerClient
from .waves import BatchState, WaveBackend, read_answer

TERMINAL = frozenset({"completed", "expired", "cancelled", "failed"})
MAX_SUBMITS = 3  # batches one request may be sent in (an expired batch's missing lines go again)
STATE_FILE = "batches.sqlite"
MAX_FILE_BYTES = 190 << 20  # one batch's input file at most (OpenAI's limit: 200 MB)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS waves (n INTEGER PRIMARY KEY, file_id TEXT, batch_id TEXT, status TEXT NOT NULL,
                                  counts TEXT, created REAL NOT NULL, done INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS wave_requests (custom_id TEXT NOT NULL, wave INTEGER NOT NULL,
                                          PRIMARY KEY (custom_id, wave));
CREATE TABLE IF NOT EXISTS answers (custom_id TEXT PRIMARY KEY, line TEXT NOT NULL);
"""


class BatchStore:
    """The batches of one run folder, in SQLite: each write is committed at once."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
        self.db.executescript(_SCHEMA)

    def new_wave(self, keys: Iterable[str]) -> int:
        self.db.execute("BEGIN IMMEDIATE")
        with self.db:  # commits, or rolls back on an error
            n = int(self.db.execute("INSERT INTO waves (status, created) VALUES ('uploading', ?)",
                                    (time.time(),)).lastrowid or 0)
            self.db.executemany("INSERT INTO wave_requests VALUES (?, ?)", [(k, n) for k in keys])
        return n

    def set(self, n: int, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE waves SET {cols} WHERE n = ?", (*fields.values(), n))  # noqa: S608 - our names

    def live(self) -> list[tuple[int, str | None, str | None, str]]:
        """The waves not finished: (n, file id, batch id, status)."""
        return list(self.db.execute("SELECT n, file_id, batch_id, status FROM waves WHERE done = 0 ORDER BY n"))

    def live_wave_of(self, key: str) -> int | None:
        row = self.db.execute("SELECT w.n FROM wave_requests r JOIN waves w ON w.n = r.wave "
                              "WHERE r.custom_id = ? AND w.done = 0", (key,)).fetchone()
        return int(row[0]) if row else None

    def keys(self, n: int) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT custom_id FROM wave_requests WHERE wave = ?", (n,))]

    def submits(self, key: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM wave_requests WHERE custom_id = ?", (key,)).fetchone()[0])

    def answer(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT line FROM answers WHERE custom_id = ?", (key,)).fetchone()
        return orjson.loads(row[0]) if row else None

    def finish(self, n: int, status: str, answers: dict[str, dict[str, Any]]) -> None:
        """The wave's answers stored and the wave marked done, in one transaction."""
        self.db.execute("BEGIN IMMEDIATE")
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)",
                                [(k, orjson.dumps(v).decode()) for k, v in answers.items()])
            self.db.execute("UPDATE waves SET status = ?, done = 1 WHERE n = ?", (status, n))

    def close(self) -> None:
        self.db.close()


def answered(line: dict[str, Any]) -> bool:
    """A line with an answer (kept: never asked again); an error line is not kept (a rerun asks
    again, as it does for a failed call in streaming mode)."""
    resp = line.get("response") or {}
    return resp.get("status_code") == 200 and isinstance(resp.get("body"), dict)


class BatchApiBackend(WaveBackend):
    """Calls as batches of ``base_url``'s Batch API, their state in ``folder/batches.sqlite``."""

    def __init__(self, model: str | None, key: Callable[[str, Request], str], *, base_url: str,
                 api_key: str | None = None, folder: Path | None = None, server: str = "auto",
                 extra_body: dict[str, Any] | None = None, max_requests: int = 50_000, poll: float = 30.0,
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 1.0) -> None:
        self.client = ServerClient(base_url, api_key, 8, timeout, max_retries, backoff)
        super().__init__(model or "", key, server=server, extra_body=extra_body, max_requests=max_requests,
                         quiet=min(1.0, max(0.2, poll)))  # the wave goes once requests stop
        self.poll, self.folder = poll, folder
        self.max_bytes, self.where = MAX_FILE_BYTES, {"state": STATE_FILE}  # in the run folder
        self.store: BatchStore | None = None
        self._broken: dict[int, BackendError] = {}  # waves whose batch could not be followed
        self._resumed = False  # the batches an earlier (killed) run left live are polled
        if not model:
            from .. import runtime

            self.model_id = runtime.run(self.client.first_model())[0]

    def bind_folder(self, folder: Path) -> None:
        """Where ``batches.sqlite`` goes, when the backend was built before the folder was known."""
        if self.folder is None:
            self.folder = folder

    async def aclose(self) -> None:
        await super().aclose()
        await self.client.aclose()
        if self.store is not None:
            self.store.close()
            self.store = None

    # ----------------------------------------------------------------------------- HTTP
    async def _http(self, method: str, path: str, **kw: Any) -> Any:
        return await self.client.call(method, path, hint=" (does the server offer the Batch API?)", **kw)

    async def _upload(self, n: int, lines: list[dict[str, Any]]) -> str:
        data = b"".join(orjson.dumps(x) + b"\n" for x in lines)

        def form() -> aiohttp.FormData:
            f = aiohttp.FormData()
            f.add_field("purpose", "batch")
            f.add_field("file", data, filename=f"cai-wave-{n:03d}.jsonl", content_type="application/jsonl")
            return f

        return str((await self._http("POST", "/files", form=form))["id"])

    async def _create(self, n: int, file_id: str) -> dict[str, Any]:
        return dict(await self._http("POST", "/batches", json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": {"cai_wave": str(n)}}))

    async def _lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        raw = await self._http("GET", f"/files/{file_id}/content", raw=True)
        return [orjson.loads(x) for x in bytes(raw).splitlines() if x.strip()]

    async def _find(self, file_id: str) -> dict[str, Any] | None:
        """The batch made of ``file_id`` (a run killed while creating it), among the latest 100."""
        try:
            data = await self._http("GET", "/batches?limit=100")
        except BackendError:
            return None
        found = [b for b in data.get("data") or () if isinstance(b, dict) and b.get("input_file_id") == file_id]
        return found[0] if found else None

    # ---------------------------------------------------------------------------- waves
    def _open(self) -> BatchStore:
        if self.store is None:
            if self.folder is None:
                raise BackendError("--batch needs an output folder (its batches.sqlite)")
            self.store = BatchStore(Path(self.folder) / STATE_FILE)
        return self.store

    async def _known(self, key: str, req: Request) -> Completion | None:
        if not self._resumed:  # once, first: poll the batches an earlier (killed) run left live
            self._resumed = True
            for n, _, batch_id, status in self._open().live():
                self.batches.setdefault(f"wave {n}", BatchState(f"wave {n}", status, batch_id=batch_id or ""))
                self.spawn(self._follow(n))
        line = self._open().answer(key)
        return read_answer(line, req, self.learned, self.model_id, self.extra_body) if line else None

    async def _enqueue(self, key: str, req: Request) -> None:
        n = self._open().live_wave_of(key)
        if n is None:
            self.queue(key, req)
        elif n in self._broken:  # its batch could not be followed: the run stops (a rerun polls it again)
            self.settle([key], self._broken[n])
        # else its batch, polled, answers it

    async def _send(self, wave: dict[str, Request]) -> None:
        """One batch per ``max_bytes`` of lines (OpenAI takes files up to 200 MB)."""
        store, part, size = self._open(), list[tuple[str, dict[str, Any]]](), 0
        items = [(k, self.line(k, r)) for k, r in wave.items()]
        for i, (k, line) in enumerate(items):
            size += len(orjson.dumps(line)) + 1
            part.append((k, line))
            if i + 1 == len(items) or size + len(orjson.dumps(items[i + 1][1])) + 1 > self.max_bytes:
                n = store.new_wave(k for k, _ in part)  # recorded before anything goes out
                self.waves += 1
                self.changed(BatchState(f"wave {n}", "uploading", 0, len(part)))
                self.spawn(self._follow(n, [x for _, x in part]))
                part, size = [], 0

    async def _follow(self, n: int, lines: list[dict[str, Any]] | None = None) -> None:
        """Upload (when ``lines``), create, poll and read wave ``n``'s batch; every failure that
        stops the run goes to the requests waiting on it."""
        store = self._open()
        try:
            _, file_id, batch_id, _ = next(r for r in store.live() if r[0] == n)
            if batch_id is None:
                if file_id is None:
                    if lines is None:  # killed before its file was uploaded: nothing went out
                        store.finish(n, "abandoned", {})
                        self._requeue(n)
                        return
                    file_id = await self._upload(n, lines)
                    store.set(n, file_id=file_id, status="uploaded")
                    self.sent += len(lines)
                # killed between the upload and the batch: the server may have made it
                batch = await self._find(file_id) if lines is None else None
                batch = batch or await self._create(n, file_id)
                batch_id = str(batch["id"])
                store.set(n, batch_id=batch_id, status=str(batch.get("status") or "validating"))
            batch = await self._wait(n, batch_id)
            status = str(batch.get("status"))
            out = await self._lines(batch.get("output_file_id")) + await self._lines(batch.get("error_file_id"))
            self._ingest(n, status, out, batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the wave's requests: the run stops with one line
            err = self._broken[n] = e if isinstance(e, BackendError) else BackendError(f"batch wave {n}: {e!r}")
            self.settle([k for k in store.keys(n) if k in self._waiting], err)

    async def _wait(self, n: int, batch_id: str) -> dict[str, Any]:
        store = self._open()
        state = self.batches.get(f"wave {n}") or BatchState(f"wave {n}", "validating")
        state.batch_id = batch_id
        while True:
            try:
                batch = await self._http("GET", f"/batches/{batch_id}")
            except HttpError as e:
                if e.status != 404:
                    raise
                batch = {"status": "lost"}  # the server no longer knows it: its requests go again
            status, counts = str(batch.get("status")), batch.get("request_counts") or {}
            if state.update(status, int(counts.get("completed") or 0), int(counts.get("total") or 0),
                            int(counts.get("failed") or 0)) or self.batches.get(state.name) is not state:
                store.set(n, status=status, counts=orjson.dumps(counts).decode())
                self.changed(state)
            if status in TERMINAL or status == "lost":
                return dict(batch)
            await asyncio.sleep(self.poll)

    def _ingest(self, n: int, status: str, lines: list[dict[str, Any]], batch: dict[str, Any]) -> None:
        """Store the answers, answer the waiting requests, send the missing ones again."""
        store = self._open()
        by_id = {str(x.get("custom_id")): x for x in lines if isinstance(x, dict)}
        keep = {k: x for k, x in by_id.items() if answered(x)}
        store.finish(n, status, keep)
        why = status if status != "failed" else f"failed: {_errors(batch)}"
        for key in store.keys(n):
            req = self._asked.get(key)
            if req is None:
                continue
            line = by_id.get(key)
            c = read_answer(line, req, self.learned, self.model_id, self.extra_body) if line else None
            if c is not None and self._refused(req, c):
                self.queue(key, req)  # a field the server refused by name: sent again without it
            elif c is not None:
                self.settle([key], c)
            elif store.submits(key) >= MAX_SUBMITS:
                self.settle([key], Failure("server", f"not answered in {MAX_SUBMITS} batches (the last {why})"))
            else:
                self.queue(key, req)

    def _refused(self, req: Request, c: Completion) -> bool:
        """A 4xx line that refuses fields by name (vLLM's, sent to OpenAI with ``--server auto``):
        learnt as streaming learns it; True when the request's body is now another."""
        failure = c.failure
        if failure is None or failure.kind != "request" or not failure.message.startswith(("HTTP 400", "HTTP 422")):
            return False
        named = refused_fields(failure.message, VLLM_FIELDS | OPTIONAL_FIELDS)
        if not named:
            return False
        self.learned.learn_refusal(failure.message, dict.fromkeys(named))
        return not named & set(self.body(req))

    def _requeue(self, n: int) -> None:
        for key in self._open().keys(n):
            if (req := self._asked.get(key)) is not None:
                self.queue(key, req)


def _errors(batch: dict[str, Any]) -> str:
    errs = (batch.get("errors") or {}).get("data") or []
    return "; ".join(str(e.get("message") or e.get("code")) for e in errs if isinstance(e, dict))[:300] or "no reason"
