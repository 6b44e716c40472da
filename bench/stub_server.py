"""A zero-latency OpenAI-compatible stub server for benchmarks: answers at once, no model.

``python bench/stub_server.py --port 0`` binds 127.0.0.1 only, prints ``listening on PORT``,
and stops by itself after ``--max-seconds`` (bounded: it never outlives a forgotten benchmark).
``POST /v1/chat/completions`` answers a short text that depends on the request body (so
that revisions differ from first answers), ``n`` choices, and top log-probs over "A"/"B" when
asked; ``GET /v1/models`` lists one model, ``GET /stats`` counts requests served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import zlib

from aiohttp import web

try:
    import orjson

    loads, dumps = orjson.loads, orjson.dumps
except ImportError:  # pragma: no cover
    loads = json.loads

    def dumps(obj: object) -> bytes:
        return json.dumps(obj).encode()


MODEL = "stub"
served = 0


def answer(body: bytes) -> bytes:
    req = loads(body)
    h = zlib.crc32(body)
    want_lp = bool(req.get("logprobs"))
    p = 0.05 + 0.9 * ((h % 1000) / 999)
    choices = []
    for i in range(int(req.get("n") or 1)):
        if want_lp:
            top = [{"token": "A", "logprob": math.log(p)},
                   {"token": "B", "logprob": math.log(1 - p)}]
            tok = top[0] if p >= 0.5 else top[1]
            lp = {"content": [{**tok, "top_logprobs": top}]}
            choices.append({"index": i, "message": {"role": "assistant", "content": tok["token"]},
                            "logprobs": lp, "finish_reason": "length"})
        else:
            text = f"Stub answer {h:08x}-{i}: a short, careful reply."
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": "stop"})
    return dumps({"id": f"cmpl-{h:08x}", "object": "chat.completion", "model": MODEL,
                  "choices": choices,
                  "usage": {"prompt_tokens": len(body) // 4, "completion_tokens": 9,
                            "total_tokens": len(body) // 4 + 9}})


async def chat(request: web.Request) -> web.Response:
    global served
    body = await request.read()
    served += 1
    return web.Response(body=answer(body), content_type="application/json")


async def models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


async def stats(_: web.Request) -> web.Response:
    return web.json_response({"served": served})


async def main(port: int, max_seconds: float) -> None:
    app = web.Application(client_max_size=1 << 20)
    app.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models),
                    web.get("/stats", stats)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    real = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"listening on {real}", flush=True)
    try:
        await asyncio.sleep(max_seconds)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=3600)
    args = ap.parse_args()
    asyncio.run(main(args.port, args.max_seconds))
    sys.exit(0)
