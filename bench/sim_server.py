"""A simulated continuous-batching LLM server (OpenAI chat API), for measuring how full a client
keeps an engine. No model: each request waits for one of ``--slots`` slots (vLLM's
max_num_seqs), holds it for ``completion_tokens x --ms-per-token``, and answers with that many
words. Completion lengths are long-tailed as real ones are: lognormal with median
``--median-frac x max_tokens`` (sigma ``--sigma``), capped at ``max_tokens`` and 256, drawn
from a hash of the request so the same request always gets the same length.

``GET /stats`` gives the busy slot-seconds and the span from the first request's arrival to
the last answer; ``POST /reset`` clears them. Utilisation = busy slot-seconds / (slots x span).

    python bench/sim_server.py --port 8791 --slots 256 --ms-per-token 2

127.0.0.1 only; stops by itself after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import time

from aiohttp import web


class Sim:
    def __init__(self, slots: int, ms_per_token: float, median_frac: float, sigma: float) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.n_slots, self.per_token = slots, ms_per_token / 1000
        self.median_frac, self.sigma = median_frac, sigma
        self.reset()

    def reset(self) -> None:
        self.busy = 0.0
        self.first: float | None = None
        self.last = 0.0
        self.requests = self.tokens = 0

    def length(self, body: dict) -> int:
        cap = min(int(body.get("max_tokens") or 256), 256)
        h = hashlib.blake2b(json.dumps(body.get("messages"), sort_keys=True).encode(), digest_size=8).digest()
        u = (int.from_bytes(h[:4], "big") + 0.5) / 2**32
        v = (int.from_bytes(h[4:], "big") + 0.5) / 2**32
        z = math.sqrt(-2 * math.log(u)) * math.cos(2 * math.pi * v)  # Box-Muller: one normal draw
        return max(1, min(cap, round(self.median_frac * cap * math.exp(self.sigma * z))))

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        n = self.length(body)
        async with self.slots:
            t0 = time.perf_counter()
            await asyncio.sleep(n * self.per_token)
            t1 = time.perf_counter()
        self.busy += t1 - t0
        self.last = max(self.last, t1)
        self.requests += 1
        self.tokens += n
        text = " ".join(f"w{i}" for i in range(n))
        prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        return web.json_response({
            "id": "sim", "object": "chat.completion", "model": body.get("model", "sim"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length" if n >= int(body.get("max_tokens") or 256) else "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n},
        })

    async def stats(self, request: web.Request) -> web.Response:
        span = (self.last - self.first) if self.first is not None else 0.0
        return web.json_response({"busy_slot_s": self.busy, "span_s": span, "slots": self.n_slots,
                                  "requests": self.requests, "tokens": self.tokens,
                                  "utilisation": self.busy / (self.n_slots * span) if span else None})

    async def do_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "sim", "object": "model"}]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--ms-per-token", type=float, default=2.0)
    ap.add_argument("--median-frac", type=float, default=0.35)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--max-seconds", type=float, default=1800)
    a = ap.parse_args()
    sim = Sim(a.slots, a.ms_per_token, a.median_frac, a.sigma)
    app = web.Application(client_max_size=64 * 2**20)
    app.add_routes([web.post("/v1/chat/completions", sim.chat), web.get("/stats", sim.stats),
                    web.post("/reset", sim.do_reset), web.get("/v1/models", sim.models)])

    async def stop_later(app: web.Application) -> None:
        asyncio.get_running_loop().call_later(a.max_seconds, os._exit, 0)

    app.on_startup.append(stop_later)
    web.run_app(app, host="127.0.0.1", port=a.port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
