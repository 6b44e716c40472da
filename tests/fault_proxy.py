"""A fault-injecting HTTP proxy for an OpenAI-compatible server: 127.0.0.1 only, bounded.

Each ``POST /v1/chat/completions`` draws one fate from a seeded RNG (``FaultProxy.rates``):

- ``http_500``: an HTTP 500 with an OpenAI-style error body; the upstream is not called;
- ``http_429``: an HTTP 429 with ``Retry-After: <retry_after>``;
- ``stall``: waits ``stall_s`` seconds before forwarding (longer than the client's timeout);
- ``drop``: forwards, then sends the headers (with the full Content-Length) and half the body,
  and closes the connection: the client sees a body cut short;
- ``truncate``: forwards, then answers 200 with the first two thirds of the JSON body (and a
  Content-Length that matches them): a complete HTTP answer whose JSON is broken;
- ``ok``: forwards as it is.

Everything else (``GET /v1/models``, ...) is forwarded untouched. ``faults`` counts the fates
drawn. In-process: ``with FaultProxy(upstream) as p: ... p.base_url``; it stops by itself after
``max_seconds``. ``python -m tests.fault_proxy --upstream http://127.0.0.1:P`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections import Counter

import aiohttp
from aiohttp import web

from tests.fake_server import ThreadedServer

DEFAULT_RATES = {"http_500": 0.10, "http_429": 0.05, "stall": 0.05, "drop": 0.05, "truncate": 0.02}


class FaultProxy(ThreadedServer):
    name = "fault-proxy"
    # handler_cancellation: a stalled handler ends when its client hangs up
    runner_options = {"handler_cancellation": True, "shutdown_timeout": 1.0}
    backlog = 1024
    client_max_size = 1 << 22

    def __init__(self, upstream: str, rates: dict[str, float] | None = None, stall_s: float = 3.0,
                 retry_after: str = "1", seed: int = 0, max_seconds: float = 120.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.rates = dict(DEFAULT_RATES if rates is None else rates)
        if sum(self.rates.values()) > 1:
            raise ValueError("fault rates add up to more than 1")
        self.stall_s = stall_s
        self.retry_after = retry_after
        self.faults: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._client: aiohttp.ClientSession | None = None
        super().__init__(max_seconds)

    def _fate(self) -> str:
        x = self._rng.random()
        for name, p in self.rates.items():
            if x < p:
                return name
            x -= p
        return "ok"

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, bytes, str]:
        assert self._client is not None
        async with self._client.request(request.method, self.upstream + request.path_qs, data=body or None,
                                        headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.read(), resp.content_type

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fate = self._fate()
        self.faults[fate] += 1
        if fate == "http_500":
            return web.json_response({"error": {"message": "injected fault: internal error", "code": 500}},
                                     status=500)
        if fate == "http_429":
            return web.json_response({"error": {"message": "injected fault: rate limited", "code": 429}},
                                     status=429, headers={"Retry-After": self.retry_after})
        if fate == "stall":
            await asyncio.sleep(self.stall_s)  # cancelled when the client gives up and hangs up
        status, data, ctype = await self._forward(request, body)
        if fate == "truncate" and status == 200:
            return web.Response(status=200, body=data[: len(data) * 2 // 3], content_type="application/json")
        if fate == "drop" and status == 200:
            resp = web.StreamResponse(status=200)
            resp.content_type = "application/json"
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()  # hang up mid-body
            return resp
        return web.Response(status=status, body=data, content_type=ctype or "application/json")

    async def _other(self, request: web.Request) -> web.Response:
        status, data, ctype = await self._forward(request, await request.read())
        return web.Response(status=status, body=data, content_type=ctype or "application/json")

    # ---------------------------------------------------------------------------- lifecycle
    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_route("*", "/{tail:.*}", self._other)

    async def opened(self) -> None:
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    async def closing(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8000 (no /v1)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--stall-s", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=3600)
    args = ap.parse_args()
    proxy = FaultProxy(args.upstream, stall_s=args.stall_s, seed=args.seed, max_seconds=args.max_seconds)
    proxy.start(args.port)
    print(f"listening on {proxy.base_url.rsplit(':', 1)[1].split('/')[0]}", flush=True)
    try:
        proxy._thread.join(args.max_seconds + 5)
    finally:
        print(dict(proxy.faults), flush=True)
        proxy.stop()
