"""A recording proxy for an OpenAI-compatible server: ``FaultProxy`` with no faults, plus a delay.

Each ``POST /v1/chat/completions`` is held ``delay`` seconds (times a seeded random factor in
[0.5, 1.5), so answers come back out of order), forwarded, and logged in ``log`` as
``[crc32(body), time received, time answered, HTTP status, body]`` (monotonic times; the answer's
are ``None`` while the call is in flight). The answer is tagged with its request: ``usage.prompt_tokens`` is set to
``crc32(body)``, which cai stores with the completion in its call cache, so a test can tell from
the cache file alone which requests were committed (``committed``).

bench/stub_server.py answers at once; a kill can only land mid-run when each call takes a while,
hence the delay here (the stub itself has no delay option).
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
import zlib
from pathlib import Path

from aiohttp import web

from tests.fault_proxy import FaultProxy


class RecordingProxy(FaultProxy):
    def __init__(self, upstream: str, delay: float = 0.0, seed: int = 0, max_seconds: float = 600.0) -> None:
        super().__init__(upstream, rates={}, seed=seed, max_seconds=max_seconds)
        self.delay = delay
        self.log: list[list] = []
        self._delays = random.Random(seed)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        crc = zlib.crc32(body)
        entry: list = [crc, time.monotonic(), None, None, body]
        self.log.append(entry)
        if self.delay:
            await asyncio.sleep(self.delay * (0.5 + self._delays.random()))
        status, data, ctype = await self._forward(request, body)
        if status == 200:
            answer = json.loads(data)
            answer.setdefault("usage", {})["prompt_tokens"] = crc
            data = json.dumps(answer).encode()
        entry[2:4] = time.monotonic(), status
        return web.Response(status=status, body=data, content_type=ctype or "application/json")

    def answered(self) -> int:
        return sum(e[2] is not None for e in list(self.log))

    def sent(self) -> list[int]:
        """The request tags (crc32 of the body), in the order received."""
        return [e[0] for e in list(self.log)]


def committed(cache: Path) -> set[int]:
    """The tags of the requests whose answers are committed in cai's call cache (``cache.sqlite``)."""
    if not cache.exists():
        return set()
    db = sqlite3.connect(str(cache), timeout=30)
    try:
        rows = db.execute("SELECT completion FROM calls").fetchall()
    finally:
        db.close()
    return {json.loads(blob)["prompt_tokens"] for (blob,) in rows}
