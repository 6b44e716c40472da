"""A stub of the OpenAI Batch API (and of chat completions, with the same answers), no model.

- ``POST /v1/files`` (multipart, purpose ``batch``) stores a JSONL file; ``GET /v1/files/{id}/content``
  returns one; ``POST /v1/batches`` makes a batch of an uploaded file (each line checked: a
  custom_id, once; method POST; url ``/v1/chat/completions``; a body); ``GET /v1/batches/{id}``
  moves it one status further per poll along ``statuses`` (validating, in_progress, finalizing,
  then its outcome) unless ``hold`` is set (it stays in_progress); ``GET /v1/batches`` lists them;
  ``POST /v1/batches/{id}/cancel`` cancels one. ``flaky["upload"|"create"|"get"|"content"] = k``:
  the next k calls of that route answer 503 with ``Retry-After: 0``.
- The outcome of each new batch is taken from ``outcomes`` (default ``completed``):
  ``("expired", k)`` answers its first k lines and puts the rest in the error file with code
  ``batch_expired``; ``("cancelled", k)`` the same with ``batch_cancelled``; ``("failed",)`` ends
  it in validation with no files.
- ``fail_line(body)`` names the requests that fail (a status code, e.g. 400, or a code and its
  message): a per-line error in the error file (and the same HTTP error from ``/v1/chat/completions``).
- The answers are the fake server's (``tests/fake_server.py``: ``BatchStub`` is a ``FakeServer``
  with the Batch-API routes added): the batch output lines and ``/v1/chat/completions`` both use
  its ``answer``, so a streaming run and a batch run against the stub get the same answers.
  ``submitted`` counts each custom_id over every batch made; ``chats`` counts streaming calls.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fake_server import FakeConfig, FakeServer, answer

MODEL = "batch-model"
STATUSES = ("validating", "in_progress", "finalizing")


def _failure(scripted: int | tuple[int, str] | None) -> tuple[int | None, str]:
    """``fail_line``'s verdict: no failure, a status code, or a status code and its message."""
    if isinstance(scripted, tuple):
        return scripted
    return scripted, "scripted line failure"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


class BatchStub(FakeServer):
    name = "batch-stub"
    client_max_size = 64 << 20

    def __init__(self, fail_line: Callable[[dict[str, Any]], int | tuple[int, str] | None] | None = None,
                 max_seconds: float = 120.0, owned_by: str = "vllm") -> None:
        # owned_by: what GET /v1/models says (``vllm``: cai takes it for vLLM)
        super().__init__(FakeConfig(model=MODEL, max_seconds=max_seconds, owned_by=owned_by))
        self.fail_line = fail_line or (lambda body: None)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.inputs: dict[str, list[dict[str, Any]]] = {}  # batch id -> its request lines
        self.steps: dict[str, int] = {}
        self.outcome: dict[str, tuple[Any, ...]] = {}
        self.outcomes: list[tuple[Any, ...]] = []  # taken in order by new batches
        self.submitted: Counter[str] = Counter()
        self.polls: Counter[str] = Counter()
        self.hold = False
        self.flaky: Counter[str] = Counter()  # route -> how many of its next calls answer 503 (Retry-After: 0)
        self.chats = 0
        self._ids = itertools.count(1)

    def _flaky(self, route: str) -> web.Response | None:
        if self.flaky[route] > 0:
            self.flaky[route] -= 1
            return web.json_response({"error": {"message": "try again"}}, status=503, headers={"Retry-After": "0"})
        return None

    # ------------------------------------------------------------------------------- files
    async def _upload(self, request: web.Request) -> web.Response:
        if (busy := self._flaky("upload")) is not None:
            await request.read()
            return busy
        form = await request.post()
        if form.get("purpose") != "batch":
            return _error(400, "purpose must be batch")
        f = form.get("file")
        data = f.file.read() if isinstance(f, web.FileField) else None
        if data is None:
            return _error(400, "no file")
        fid = f"file-{next(self._ids)}"
        self.files[fid] = data
        return web.json_response({"id": fid, "object": "file", "bytes": len(data), "purpose": "batch",
                                  "filename": getattr(f, "filename", ""), "created_at": int(time.time())})

    async def _content(self, request: web.Request) -> web.Response:
        if (busy := self._flaky("content")) is not None:
            return busy
        fid = request.match_info["fid"]
        if fid not in self.files:
            return _error(404, f"no file {fid}")
        return web.Response(body=self.files[fid], content_type="application/octet-stream")

    # ----------------------------------------------------------------------------- batches
    async def _create(self, request: web.Request) -> web.Response:
        if (busy := self._flaky("create")) is not None:
            return busy
        spec = await request.json()
        fid = spec.get("input_file_id")
        if fid not in self.files:
            return _error(400, f"no file {fid}")
        if spec.get("endpoint") != "/v1/chat/completions" or spec.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        lines = [json.loads(x) for x in self.files[fid].splitlines() if x.strip()]
        ids = [x.get("custom_id") for x in lines]
        if len(set(ids)) != len(ids) or not all(isinstance(i, str) for i in ids):
            return _error(400, "custom_id missing or repeated in the file")
        if any(x.get("method") != "POST" or x.get("url") != "/v1/chat/completions"
               or not isinstance(x.get("body"), dict) for x in lines):
            return _error(400, "each line needs method POST, url /v1/chat/completions and a body")
        bid = f"batch_{next(self._ids)}"
        self.submitted.update(ids)
        self.inputs[bid] = lines
        self.steps[bid] = 0
        self.outcome[bid] = self.outcomes.pop(0) if self.outcomes else ("completed",)
        self.batches[bid] = {"id": bid, "object": "batch", "endpoint": spec["endpoint"], "input_file_id": fid,
                             "completion_window": "24h", "status": STATUSES[0], "output_file_id": None,
                             "error_file_id": None, "errors": None, "created_at": int(time.time()),
                             "metadata": spec.get("metadata"),
                             "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        return web.json_response(self.batches[bid])

    async def _get(self, request: web.Request) -> web.Response:
        bid = request.match_info["bid"]
        if (busy := self._flaky("get")) is not None:
            return busy
        if bid not in self.batches:
            return _error(404, f"no batch {bid}")
        self.polls[bid] += 1
        b = self.batches[bid]
        if b["status"] in ("validating", "in_progress", "finalizing", "cancelling") and not (
                self.hold and b["status"] == "in_progress"):
            self._advance(bid)
        return web.json_response(b)

    def _advance(self, bid: str) -> None:
        b, lines = self.batches[bid], self.inputs[bid]
        if b["status"] == "cancelling":
            self._finish(bid, "cancelled", 0)
            return
        self.steps[bid] += 1
        outcome = self.outcome[bid]
        if outcome[0] == "failed" and self.steps[bid] >= 1:
            b.update(status="failed", errors={"object": "list", "data": [
                {"code": "invalid_request", "message": "scripted validation failure", "line": None}]})
            return
        if self.steps[bid] < len(STATUSES):
            b["status"] = STATUSES[self.steps[bid]]
            done = len(lines) // 2 if b["status"] == "in_progress" else len(lines)
            b["request_counts"]["completed"] = done
            return
        keep = outcome[1] if len(outcome) > 1 else len(lines)
        self._finish(bid, outcome[0], keep)

    def _finish(self, bid: str, status: str, keep: int) -> None:
        b, lines = self.batches[bid], self.inputs[bid]
        out, errs = [], []
        for i, x in enumerate(lines):
            rid = f"batch_req_{bid}_{i}"
            if i >= keep and status in ("expired", "cancelled"):
                errs.append({"id": rid, "custom_id": x["custom_id"], "response": None, "error": {
                    "code": f"batch_{status}", "message": f"This request was not run: the batch was {status}."}})
                continue
            code, why = _failure(self.fail_line(x["body"]))
            if code:
                errs.append({"id": rid, "custom_id": x["custom_id"], "error": None, "response": {
                    "status_code": code, "request_id": rid,
                    "body": {"error": {"message": why, "type": "invalid_request_error"}}}})
            else:
                out.append({"id": rid, "custom_id": x["custom_id"], "error": None, "response": {
                    "status_code": 200, "request_id": rid, "body": self.answer(x["body"])}})
        for kind, rows in (("output_file_id", out), ("error_file_id", errs)):
            if rows:
                fid = f"file-{next(self._ids)}"
                self.files[fid] = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                b[kind] = fid
        b["status"] = status
        b["request_counts"] = {"total": len(lines), "completed": len(out),
                               "failed": sum(e["response"] is not None for e in errs)}

    async def _cancel(self, request: web.Request) -> web.Response:
        bid = request.match_info["bid"]
        b = self.batches.get(bid)
        if b is None:
            return _error(404, f"no batch {bid}")
        if b["status"] in ("validating", "in_progress", "finalizing"):
            b["status"] = "cancelling"
        return web.json_response(b)

    async def _list(self, request: web.Request) -> web.Response:
        data = list(reversed(self.batches.values()))[: int(request.query.get("limit", 20))]
        return web.json_response({"object": "list", "data": data, "has_more": False})

    # ------------------------------------------------------------------------------- chat
    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.chats += 1
        code, why = _failure(self.fail_line(await request.json()))
        if code:
            return _error(code, why)
        return await super().chat(request)  # the body read again: aiohttp keeps it

    def routes(self, app: web.Application) -> None:
        super().routes(app)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{fid}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{bid}", self._get)
        app.router.add_post("/v1/batches/{bid}/cancel", self._cancel)


def answer_file(requests: bytes, fail_line: Callable[[dict[str, Any]], int | None] | None = None) -> bytes:
    """The Batch-API output of a requests file (what `vllm run-batch` writes), by ``answer``."""
    out = []
    for i, raw in enumerate(x for x in requests.splitlines() if x.strip()):
        x = json.loads(raw)
        code = fail_line(x["body"]) if fail_line else None
        resp = ({"status_code": code, "body": {"error": {"message": "scripted line failure"}}} if code
                else {"status_code": 200, "body": answer(x["body"], FakeConfig(model=MODEL))})
        out.append(json.dumps({"id": f"req-{i}", "custom_id": x["custom_id"], "response": resp, "error": None}))
    return "".join(x + "\n" for x in out).encode()
