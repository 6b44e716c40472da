"""THE configurable fake OpenAI-compatible chat server for tests and benchmarks: 127.0.0.1 only, bounded.

``FakeConfig`` says how it behaves; ``answer(body, config)`` is what it answers (a pure function,
so another stub, e.g. a Batch-API one, can answer the same requests the same way):

- the text is derived from the request (its messages, seed and the choice's index), so two runs
  get identical outputs; ``n`` choices; a constrained choice (vLLM's ``structured_outputs`` /
  ``guided_choice``, or a ``response_format`` JSON-schema enum) is honoured by picking one of the
  choices from the same hash; ``max_tokens`` cuts the text (``finish_reason: length``);
- log-probs over ``"A"``/``"B"`` when ``logprobs`` is asked (the answer is then that one token);
- ``usage`` in every answer: ``prompt_tokens`` counted from the messages (``count_prompt``: 4 per
  message plus one per 4 characters of content), ``completion_tokens`` (one per word of each
  choice), and ``prompt_tokens_details.cached_tokens`` when ``cached_tokens`` is set.

The server (``FakeServer``) adds what a hosted provider does: an RPM and a TPM limit over a
sliding window (``window_s``, 60 s as providers do; shorter in fast tests: the limits then allow
``rpm * window_s / 60`` requests per window), enforced with HTTP 429 and ``Retry-After`` (seconds
until the window has room; TPM counts each request's prompt + completion tokens when it is
admitted), optionally OpenAI's ``x-ratelimit-*`` headers on every answer and 429
(``ratelimit_headers``: limit, remaining and reset, of requests and of tokens, counted over its
window), an optional ``latency_s``, and counters: ``served``, ``refused_429``, the tokens
served, every request body received (``bodies``), the time each answered request was admitted
(``admitted``) and the most requests it held at once (``max_in_flight``). ``GET /v1/models``
lists the model; ``GET /stats`` gives the counters.

``strict=True`` makes it behave as OpenAI's own API does for cai's requests: a field outside
OpenAI's chat-completions schema is refused with a 400 (``Unrecognized request argument(s)
supplied: ...``: vLLM's ``continue_final_message``, ``structured_outputs``...; listed in
``refused``), ``n`` is ignored (one choice), ``logprobs`` is taken but none come back, the model
must be the one listed (404), and a ``response_format`` JSON schema is honoured, or refused with a
400 when ``json_schema=False`` (as older OpenAI models do). ``reply(body)`` replaces the text of a
plain answer.

In-process: ``with FakeServer(FakeConfig(rpm=600)) as s: ... s.base_url`` runs it on its own loop
and thread (``s.url`` is the URL without ``/v1``); it stops by itself after ``max_seconds``.
More routes: pass ``routes=`` (a function of ``(app, server)``) or override ``add_routes``.
``ThreadedServer`` (the loop-and-thread part) and ``RouteServer`` (a server of routes given as a
function) are there for other test servers (tests/fault_proxy.py; one-off handlers in tests).
``python -m tests.fake_server --port 0 [--rpm N --tpm N --window-s S --latency-s S]`` runs it
alone and prints ``listening on PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web

MODEL = "fake-model"
# OpenAI's chat-completions request fields (the ones a client may send): all a strict server takes.
OPENAI_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
    "stop", "logprobs", "top_logprobs", "response_format", "frequency_penalty", "presence_penalty",
    "logit_bias", "user", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
    "metadata", "store", "service_tier", "reasoning_effort", "modalities", "audio", "prediction",
    "web_search_options", "prompt_cache_key", "safety_identifier", "verbosity",
})


@dataclass
class FakeConfig:
    model: str = MODEL
    rpm: int | None = None  # requests per minute (per window_s * rpm / 60 requests per window)
    tpm: int | None = None  # tokens (prompt + completion) per minute
    window_s: float = 60.0  # the sliding window the limits are counted over
    retry_after: bool = True  # send Retry-After with a 429
    ratelimit_headers: bool = False  # send x-ratelimit-{limit,remaining,reset}-{requests,tokens} (of the window)
    latency_s: float = 0.0  # each admitted request is answered after this long
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens: min(this, prompt_tokens) when > 0
    words: int = 9  # words in a plain answer (before max_tokens cuts it)
    max_seconds: float = 120.0  # the server stops by itself after this long
    strict: bool = False  # as OpenAI's API: unknown fields refused, n ignored, no log-probs
    json_schema: bool = True  # strict: honour response_format json_schema (False: refuse it, 400)
    reply: Callable[[dict[str, Any]], str] | None = None  # the text of a plain answer (default: from the request)


def _hash(*parts: Any) -> int:
    return zlib.crc32(json.dumps(parts, sort_keys=True, default=str).encode())


def count_prompt(messages: Any) -> int:
    """The prompt tokens of ``messages``: 4 per message plus one per 4 characters of content."""
    if not isinstance(messages, list):
        return 0
    return sum(4 + math.ceil(len(str(m.get("content") or "")) / 4) for m in messages if isinstance(m, dict))


def _choices_asked(body: dict[str, Any]) -> tuple[list[str], str | None] | None:
    """The choices a constrained answer must be one of, and the JSON key to wrap it in (or None)."""
    so = body.get("structured_outputs")
    if isinstance(so, dict) and isinstance(so.get("choice"), list):
        return [str(c) for c in so["choice"]], None
    if isinstance(body.get("guided_choice"), list):
        return [str(c) for c in body["guided_choice"]], None
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        props = ((rf.get("json_schema") or {}).get("schema") or {}).get("properties") or {}
        for key, prop in props.items():
            if isinstance(prop, dict) and isinstance(prop.get("enum"), list):
                return [str(c) for c in prop["enum"]], str(key)
    return None


def answer(body: dict[str, Any], config: FakeConfig | None = None) -> dict[str, Any]:
    """The chat completion the fake server answers to ``body`` (deterministic in the request)."""
    cfg = config or FakeConfig()
    messages = body.get("messages")
    h = _hash(messages, body.get("seed"))
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or 4096
    constrained = _choices_asked(body)
    choices, completion = [], 0
    for i in range(1 if cfg.strict else max(1, int(body.get("n") or 1))):
        lp = None
        if body.get("logprobs") and not cfg.strict:
            p = 0.05 + 0.9 * (((h + i) % 1000) / 999)
            top = [{"token": "A", "logprob": math.log(p)}, {"token": "B", "logprob": math.log(1 - p)}]
            tok = top[0] if p >= 0.5 else top[1]
            text, finish, used = tok["token"], "length", 1
            lp = {"content": [{**tok, "top_logprobs": top[: max(1, int(body.get("top_logprobs") or 2))]}]}
        elif constrained is not None:
            options, key = constrained
            pick = options[(h + i) % len(options)] if options else ""
            text = json.dumps({key: pick}) if key else pick
            finish, used = "stop", 1
        else:
            words = cfg.reply(body) if cfg.reply is not None else \
                f"Fake answer {h:08x}-{i}: {' '.join(f'w{(h >> k) % 97}' for k in range(cfg.words - 3))}"
            split = words.split()
            finish = "length" if len(split) > limit else "stop"
            split = split[:limit]
            text, used = " ".join(split), len(split)
        completion += used
        choices.append({"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": lp, "finish_reason": finish})
    prompt = count_prompt(messages)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if cfg.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": min(cfg.cached_tokens, prompt)}
    return {"id": f"chatcmpl-{h:08x}", "object": "chat.completion", "created": 0, "model": cfg.model,
            "choices": choices, "usage": usage}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                             status=status, headers=headers)


class Window:
    """What was admitted in the last ``seconds``: requests and tokens, as a provider's limiter counts."""

    def __init__(self, seconds: float, requests: float | None, tokens: float | None) -> None:
        self.seconds, self.requests, self.tokens = seconds, requests, tokens
        self.log: deque[tuple[float, int]] = deque()
        self.used = 0

    def admit(self, cost: int, now: float) -> float | None:
        """None when a request of ``cost`` tokens is admitted now (and counted), else the seconds
        until the window has room for it."""
        while self.log and self.log[0][0] <= now - self.seconds:
            self.used -= self.log.popleft()[1]
        waits = []
        if self.requests is not None and len(self.log) + 1 > self.requests:
            waits.append(self.log[len(self.log) - int(self.requests)][0] + self.seconds - now)
        if self.tokens is not None and self.used + cost > self.tokens:
            if cost > self.tokens:  # never fits: a provider says "request too large"
                waits.append(self.seconds)
            else:
                free, wait = self.tokens - self.used, self.seconds
                for t, c in self.log:
                    free += c
                    if free >= cost:
                        wait = t + self.seconds - now
                        break
                waits.append(wait)
        if waits:
            return max(0.001, max(waits))
        self.log.append((now, cost))
        self.used += cost
        return None

    def headers(self, now: float) -> dict[str, str]:
        """``x-ratelimit-*`` as OpenAI sends them, of this window: the limit, what is left, and the
        time until all of it is given back (``1.25s``)."""
        out = {}
        reset = f"{max(0.0, self.log[-1][0] + self.seconds - now) if self.log else 0.0:.3f}s"
        for kind, limit, used in (("requests", self.requests, len(self.log)), ("tokens", self.tokens, self.used)):
            if limit is not None:
                out |= {f"x-ratelimit-limit-{kind}": str(int(limit)),
                        f"x-ratelimit-remaining-{kind}": str(max(0, int(limit - used))),
                        f"x-ratelimit-reset-{kind}": reset}
        return out


class ThreadedServer:
    """An aiohttp server on its own event loop and thread: 127.0.0.1 only, bounded. A subclass
    adds its routes in ``routes(app)`` (and may open/close its own resources in
    ``opened``/``closing``); ``with Server(...) as s: ... s.base_url`` runs it, and it stops by
    itself after ``max_seconds`` even if a test forgets to."""

    name = "test-server"
    runner_options: dict[str, Any] = {}  # web.AppRunner's keyword arguments
    backlog = 128
    client_max_size = 1 << 20

    def __init__(self, max_seconds: float = 120.0) -> None:
        self.max_seconds = max_seconds
        self.base_url = self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True)
        self._runner: web.AppRunner | None = None
        self._timer: asyncio.TimerHandle | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def opened(self) -> None:
        """Runs on the server's loop before it listens."""

    async def closing(self) -> None:
        """Runs on the server's loop after it stopped listening."""

    async def _up(self, port: int) -> int:
        await self.opened()
        app = web.Application(client_max_size=self.client_max_size)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, **self.runner_options)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, backlog=self.backlog)
        await site.start()
        self._timer = self._loop.call_later(self.max_seconds, lambda: asyncio.ensure_future(self._down()))
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _down(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self.closing()

    def start(self, port: int = 0) -> Self:
        self._thread.start()
        real = asyncio.run_coroutine_threadsafe(self._up(port), self._loop).result(10)
        self.url = f"http://127.0.0.1:{real}"
        self.base_url = self.url + "/v1"
        return self

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._down(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RouteServer(ThreadedServer):
    """A ``ThreadedServer`` whose routes come from a function: ``RouteServer(add_routes).start()``."""

    def __init__(self, add_routes: Callable[[web.Application], None], max_seconds: float = 120.0,
                 **runner_options: Any) -> None:
        super().__init__(max_seconds)
        self._add_routes = add_routes
        self.runner_options = runner_options

    def routes(self, app: web.Application) -> None:
        self._add_routes(app)


class FakeServer(ThreadedServer):
    """The fake server (see the module's docstring)."""

    name = "fake-server"
    runner_options = {"handler_cancellation": True, "shutdown_timeout": 1.0}
    backlog = 1024
    client_max_size = 1 << 22

    def __init__(self, config: FakeConfig | None = None,
                 routes: Callable[[web.Application, FakeServer], None] | None = None, **fields: Any) -> None:
        if config is not None and fields:
            raise TypeError("pass a FakeConfig or its fields, not both")
        self.config = config or FakeConfig(**fields)
        self._extra_routes = routes
        self.bodies: list[dict[str, Any]] = []  # every request body received
        self.refused: list[list[str]] = []  # strict: the unknown fields of each refused request
        self.admitted: list[float] = []  # time.monotonic() when each answered request was admitted
        self.served = self.refused_429 = self.in_flight = self.max_in_flight = 0
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        c = self.config
        per_window = c.window_s / 60
        self.window = Window(c.window_s, None if c.rpm is None else max(1.0, c.rpm * per_window),
                             None if c.tpm is None else c.tpm * per_window)
        super().__init__(c.max_seconds)

    # ------------------------------------------------------------------------------ answers
    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        return answer(body, self.config)

    def stats(self) -> dict[str, Any]:
        return {"served": self.served, "refused_429": self.refused_429, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens,
                "received": len(self.bodies)}

    def throughput(self) -> float:
        """Answered requests per minute, from the first admitted to the last (0 with fewer than 2)."""
        t = sorted(self.admitted)
        return 60 * (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0

    async def chat(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        self.bodies.append(body)
        if self.config.strict and (refusal := self.strict_refusal(body)) is not None:
            return refusal
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "'messages' is a required property")
        data = self.answer(body)
        usage = data["usage"]
        now = time.monotonic()
        wait = self.window.admit(usage["prompt_tokens"] + usage["completion_tokens"], now)
        if wait is not None:
            self.refused_429 += 1
            headers = {"Retry-After": f"{math.ceil(wait * 1000) / 1000:.3f}"} if self.config.retry_after else {}
            if self.config.ratelimit_headers:
                headers |= self.window.headers(now)
            return _error(429, "Rate limit reached: too many requests or tokens per minute; try again later.",
                          headers or None)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.config.latency_s:
                await asyncio.sleep(self.config.latency_s)
        finally:
            self.in_flight -= 1
        self.admitted.append(now)
        self.served += 1
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return web.json_response(data, headers=self.window.headers(now) if self.config.ratelimit_headers else None)

    def strict_refusal(self, body: dict[str, Any]) -> web.Response | None:
        """What OpenAI's API answers to a request it refuses (None: it takes it)."""
        unknown = sorted(set(body) - OPENAI_FIELDS)
        if unknown:
            self.refused.append(unknown)
            s = "s" if len(unknown) > 1 else ""
            return _error(400, f"Unrecognized request argument{s} supplied: {', '.join(unknown)}")
        if body.get("model") != self.config.model:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            return _error(400, "'top_logprobs' requires 'logprobs' to be true")
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_schema":
            if not self.config.json_schema:
                return _error(400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported "
                                   "with this model.")
            schema = (rf.get("json_schema") or {}).get("schema") or {}
            if schema.get("type") != "object" or schema.get("additionalProperties") is not False:
                return _error(400, "Invalid schema for response_format: the root must be an object with "
                                   "additionalProperties false.")
        return None

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.config.model, "object": "model", "created": 0, "owned_by": "fake"}]})

    async def stats_route(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats_route)
        if self._extra_routes is not None:
            self._extra_routes(app, self)

    def routes(self, app: web.Application) -> None:
        self.add_routes(app)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rpm", type=int)
    ap.add_argument("--tpm", type=int)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--latency-s", type=float, default=0.0)
    ap.add_argument("--cached-tokens", type=int, default=0)
    ap.add_argument("--strict", action="store_true", help="as OpenAI's API: unknown fields refused, n ignored")
    ap.add_argument("--max-seconds", type=float, default=3600)
    a = ap.parse_args()
    server = FakeServer(FakeConfig(rpm=a.rpm, tpm=a.tpm, window_s=a.window_s, latency_s=a.latency_s,
                                   cached_tokens=a.cached_tokens, max_seconds=a.max_seconds,
                                   strict=a.strict)).start(a.port)
    print(f"listening on {server.url.rsplit(':', 1)[1]}", flush=True)
    try:
        server._thread.join(a.max_seconds + 5)
    except KeyboardInterrupt:
        pass
    finally:
        print(json.dumps(server.stats()), flush=True)
        server.stop()


if __name__ == "__main__":
    main()
