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

Faults, recording, a proxy (what tests/fault_proxy.py and tests/recording_proxy.py were):

- ``faults``: each chat request draws one fate from a seeded RNG (``seed``), a rate per fate
  (``DEFAULT_FAULTS``): ``http_500`` (an HTTP 500, not answered), ``http_429`` (with ``Retry-After:
  fault_retry_after``), ``stall`` (waits ``stall_s`` before answering: past the client's timeout),
  ``drop`` (the headers with the full Content-Length, half the body, then the connection is
  closed), ``truncate`` (a 200 with the first two thirds of the JSON); ``ok`` otherwise.
  ``faults_drawn`` counts the fates.
- ``log``: every chat request as ``[crc32(body), time received, time answered, HTTP status,
  body]`` (monotonic times; the answer's are ``None`` while it is in flight); ``sent()`` lists the
  tags in order, ``answered()`` counts the answered. ``tag=True`` sets each answer's
  ``usage.prompt_tokens`` to ``crc32(body)``, which cai stores with the completion in its call
  cache, so a test can tell from the cache file alone which requests were committed
  (``committed``). ``jitter=True`` multiplies ``latency_s`` by a seeded factor in [0.5, 1.5), so
  answers come back out of order.
- ``upstream``: a proxy: chat requests are forwarded there (after the faults and the latency)
  instead of answered, and every other route too.

Two modes for benchmarks (what bench/stub_server.py and bench/sim_server.py were):

- ``stub=True``: the zero-latency stub: a lean handler that answers at once from the body's crc32
  (``stub_answer``: ``n`` choices, log-probs over "A"/"B"; orjson when installed), counting
  ``served`` and nothing else, so that the server costs as little as can be per call.
- ``slots=S``: a simulated continuous-batching engine (``Engine``): each request waits for one
  of S slots (vLLM's max_num_seqs), holds it for ``completion_tokens x ms_per_token`` and answers
  that many words. Completion lengths are long-tailed as real ones are: lognormal with median
  ``median_frac x max_tokens`` (sigma ``sigma``), capped at ``max_tokens`` and 256, drawn from a
  hash of the messages. ``GET /stats`` adds the busy slot-seconds, the span from the first
  arrival to the last answer and ``utilisation`` = busy / (slots x span); ``POST /reset`` clears them.

In-process: ``with FakeServer(FakeConfig(rpm=600)) as s: ... s.base_url`` runs it on its own loop
and thread (``s.url`` is the URL without ``/v1``); it stops by itself after ``max_seconds``;
``stop()`` lets requests in flight finish for ``shutdown_s``, then cuts their connections.
More routes: pass ``routes=`` (a function of ``(app, server)``) or override ``add_routes``.
``ThreadedServer`` (the loop-and-thread part) and ``RouteServer`` (a server of routes given as a
function) are there for other test servers (tests/fake_batch.py; one-off handlers in tests).
This file imports nothing of the project: ``python tests/fake_server.py --port 0 [--stub |
--slots S --ms-per-token T | --upstream URL --faults default ...]`` runs it alone (see
``--help``) and prints ``listening on PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import math
import random
import sqlite3
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp
from aiohttp import web

try:
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
except ImportError:  # pragma: no cover
    _loads = json.loads  # type: ignore[assignment]

    def _dumps(obj: object) -> bytes:  # type: ignore[misc]
        return json.dumps(obj).encode()


MODEL = "fake-model"
# OpenAI's chat-completions request fields (the ones a client may send): all a strict server takes.
OPENAI_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
    "stop", "logprobs", "top_logprobs", "response_format", "frequency_penalty", "presence_penalty",
    "logit_bias", "user", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
    "metadata", "store", "service_tier", "reasoning_effort", "modalities", "audio", "prediction",
    "web_search_options", "prompt_cache_key", "safety_identifier", "verbosity",
})
DEFAULT_FAULTS = {"http_500": 0.10, "http_429": 0.05, "stall": 0.05, "drop": 0.05, "truncate": 0.02}


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
    shutdown_s: float = 1.0  # stop(): how long requests in flight may finish before their connections are cut
    strict: bool = False  # as OpenAI's API: unknown fields refused, n ignored, no log-probs
    json_schema: bool = True  # strict: honour response_format json_schema (False: refuse it, 400)
    reply: Callable[[dict[str, Any]], str] | None = None  # the text of a plain answer (default: from the request)
    owned_by: str = "fake"  # what GET /v1/models says of the model ("vllm": cai takes the server for vLLM)
    # faults, recording, proxy
    faults: dict[str, float] = field(default_factory=dict)  # fate -> rate (DEFAULT_FAULTS): drawn per chat request
    stall_s: float = 3.0  # the "stall" fault's wait
    fault_retry_after: str = "1"  # the "http_429" fault's Retry-After
    seed: int = 0  # the RNGs of the faults and of the jitter
    jitter: bool = False  # latency_s x a seeded factor in [0.5, 1.5)
    tag: bool = False  # usage.prompt_tokens = crc32(request body)
    upstream: str | None = None  # a proxy: forward to this server (URL without /v1) instead of answering
    # benchmark modes
    stub: bool = False  # the zero-latency stub (stub_answer, nothing counted but served)
    slots: int | None = None  # a simulated continuous-batching engine of this many slots
    ms_per_token: float = 2.0  # engine: the time a slot is held per completion token
    median_frac: float = 0.35  # engine: median completion length, as a fraction of max_tokens
    sigma: float = 0.8  # engine: the lognormal's sigma


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


def stub_answer(body: bytes, model: str) -> bytes:
    """The zero-latency stub's answer to a raw request body: a short text from its crc32 (so that
    revisions differ from first answers), ``n`` choices, top log-probs over "A"/"B" when asked."""
    req = _loads(body)
    h = zlib.crc32(body)
    want_lp = bool(req.get("logprobs"))
    p = 0.05 + 0.9 * ((h % 1000) / 999)
    choices = []
    for i in range(int(req.get("n") or 1)):
        if want_lp:
            top = [{"token": "A", "logprob": math.log(p)}, {"token": "B", "logprob": math.log(1 - p)}]
            tok = top[0] if p >= 0.5 else top[1]
            choices.append({"index": i, "message": {"role": "assistant", "content": tok["token"]},
                            "logprobs": {"content": [{**tok, "top_logprobs": top}]}, "finish_reason": "length"})
        else:
            choices.append({"index": i, "message": {"role": "assistant",
                                                    "content": f"Stub answer {h:08x}-{i}: a short, careful reply."},
                            "logprobs": None, "finish_reason": "stop"})
    return _dumps({"id": f"cmpl-{h:08x}", "object": "chat.completion", "model": model, "choices": choices,
                   "usage": {"prompt_tokens": len(body) // 4, "completion_tokens": 9,
                             "total_tokens": len(body) // 4 + 9}})


class Engine:
    """The simulated continuous-batching engine (``slots=S``; see the module's docstring)."""

    def __init__(self, slots: int, ms_per_token: float, median_frac: float, sigma: float) -> None:
        self.slots = asyncio.Semaphore(slots)  # bound to the server's loop on first use
        self.n_slots, self.per_token = slots, ms_per_token / 1000
        self.median_frac, self.sigma = median_frac, sigma
        self.reset()

    def reset(self) -> None:
        self.busy = 0.0
        self.first: float | None = None
        self.last = 0.0
        self.requests = self.tokens = 0

    def length(self, body: dict[str, Any]) -> int:
        cap = min(int(body.get("max_tokens") or 256), 256)
        h = hashlib.blake2b(json.dumps(body.get("messages"), sort_keys=True).encode(), digest_size=8).digest()
        u = (int.from_bytes(h[:4], "big") + 0.5) / 2**32
        v = (int.from_bytes(h[4:], "big") + 0.5) / 2**32
        z = math.sqrt(-2 * math.log(u)) * math.cos(2 * math.pi * v)  # Box-Muller: one normal draw
        return max(1, min(cap, round(self.median_frac * cap * math.exp(self.sigma * z))))

    async def answer(self, body: dict[str, Any], model: str) -> dict[str, Any]:
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
        prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        text = " ".join(f"w{i}" for i in range(n))
        return {"id": "sim", "object": "chat.completion", "model": body.get("model", model),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length" if n >= int(body.get("max_tokens") or 256) else "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}}

    def stats(self) -> dict[str, Any]:
        span = (self.last - self.first) if self.first is not None else 0.0
        return {"busy_slot_s": self.busy, "span_s": span, "slots": self.n_slots, "requests": self.requests,
                "tokens": self.tokens, "utilisation": self.busy / (self.n_slots * span) if span else None}


def committed(cache: Path) -> set[int]:
    """The tags (``tag=True``) of the requests whose answers are committed in cai's call cache
    (``cache.sqlite``)."""
    if not cache.exists():
        return set()
    db = sqlite3.connect(str(cache), timeout=30)
    try:
        rows = db.execute("SELECT completion FROM calls").fetchall()
    finally:
        db.close()
    return {json.loads(blob)["prompt_tokens"] for (blob,) in rows}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    error = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
    return status, json.dumps(error).encode(), headers


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
        out: dict[str, str] = {}
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

    async def _drain(self, server: web.Server | None) -> None:
        """After ``_down``: nothing of the server outlives its loop. Handlers still waiting are
        cancelled and connections the server still holds closed; a connection accepted as the
        site closed can be left with a transport whose ``connection_made`` never ran (so neither
        the server nor asyncio's registry holds it, only a reference cycle): found among the
        collector's objects and closed (type(), not isinstance, so no object's __class__ runs).
        The closed transports let go of their sockets on a later turn of the loop."""
        for _ in range(5):
            await asyncio.sleep(0)
            for handler in server.connections if server is not None else []:
                handler.force_close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in [o for o in gc.get_objects() if issubclass(type(o), asyncio.Transport)]:
            if getattr(t, "_loop", None) is self._loop and not t.is_closing():
                t.close()
        for _ in range(3):
            await asyncio.sleep(0)

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        server = self._runner.server if self._runner is not None else None
        asyncio.run_coroutine_threadsafe(self._down(), self._loop).result(15)
        asyncio.run_coroutine_threadsafe(self._drain(server), self._loop).result(15)
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
    # handler_cancellation: a stalled handler ends when its client hangs up
    runner_options: dict[str, Any] = {"handler_cancellation": True}
    backlog = 1024
    client_max_size = 1 << 22

    def __init__(self, config: FakeConfig | None = None,
                 routes: Callable[[web.Application, FakeServer], None] | None = None, **fields: Any) -> None:
        if config is not None and fields:
            raise TypeError("pass a FakeConfig or its fields, not both")
        self.config = c = config or FakeConfig(**fields)
        if sum(c.faults.values()) > 1:
            raise ValueError("fault rates add up to more than 1")
        self._extra_routes = routes
        self.bodies: list[dict[str, Any]] = []  # every request body received
        self.refused: list[list[str]] = []  # strict: the unknown fields of each refused request
        self.admitted: list[float] = []  # time.monotonic() when each answered request was admitted
        self.log: list[list[Any]] = []  # [crc32(body), received, answered, status, body] of each chat request
        self.faults_drawn: Counter[str] = Counter()
        self.served = self.refused_429 = self.in_flight = self.max_in_flight = 0
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        per_window = c.window_s / 60
        self.window = Window(c.window_s, None if c.rpm is None else max(1.0, c.rpm * per_window),
                             None if c.tpm is None else c.tpm * per_window)
        self.engine = None if c.slots is None else Engine(c.slots, c.ms_per_token, c.median_frac, c.sigma)
        self._fates, self._delays = random.Random(c.seed), random.Random(c.seed)
        self._client: aiohttp.ClientSession | None = None
        super().__init__(c.max_seconds)
        self.runner_options = {**FakeServer.runner_options, "shutdown_timeout": c.shutdown_s}

    # ------------------------------------------------------------------------------ answers
    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        return answer(body, self.config)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "served": self.served, "refused_429": self.refused_429, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens,
            "received": len(self.bodies)}
        return out if self.engine is None else out | self.engine.stats()

    def throughput(self) -> float:
        """Answered requests per minute, from the first admitted to the last (0 with fewer than 2)."""
        t = sorted(self.admitted)
        return 60 * (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0

    def answered(self) -> int:
        return sum(e[2] is not None for e in list(self.log))

    def sent(self) -> list[int]:
        """The request tags (crc32 of the body), in the order received."""
        return [e[0] for e in list(self.log)]

    def _fate(self) -> str:
        x = self._fates.random()
        for name, p in self.config.faults.items():
            if x < p:
                return name
            x -= p
        return "ok"

    def _latency(self) -> float:
        c = self.config
        return c.latency_s * (0.5 + self._delays.random()) if c.jitter else c.latency_s

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """A chat request: its fault drawn, answered (or forwarded upstream), tagged, logged."""
        c = self.config
        raw = await request.read()
        entry: list[Any] = [zlib.crc32(raw), time.monotonic(), None, None, raw]
        self.log.append(entry)
        fate = "ok"
        if c.faults:
            self.faults_drawn[fate := self._fate()] += 1
        if fate == "http_500":
            status, data, headers = _error(500, "injected fault: internal error")
        elif fate == "http_429":
            status, data, headers = _error(429, "injected fault: rate limited", {"Retry-After": c.fault_retry_after})
        else:
            if fate == "stall":
                await asyncio.sleep(c.stall_s)  # cancelled when the client gives up and hangs up
            if c.upstream:
                if c.latency_s:
                    await asyncio.sleep(self._latency())
                status, data, headers = await self._forward(request, raw)
            else:
                status, data, headers = await self._serve(raw)
        if c.tag and status == 200:
            tagged = json.loads(data)
            tagged.setdefault("usage", {})["prompt_tokens"] = entry[0]
            data = json.dumps(tagged).encode()
        entry[2:4] = time.monotonic(), status
        if fate == "truncate" and status == 200:
            data = data[: len(data) * 2 // 3]
        if fate == "drop" and status == 200:
            resp = web.StreamResponse(status=200)
            resp.content_type = "application/json"
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()  # hang up mid-body
            return resp
        return web.Response(status=status, body=data, content_type="application/json", headers=headers)

    async def _serve(self, raw: bytes) -> tuple[int, bytes, dict[str, str] | None]:
        """The answer to a chat request (status, body, headers): the limits, then the answer."""
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        self.bodies.append(body)
        if self.config.strict and (refusal := self.strict_refusal(body)) is not None:
            return refusal
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "'messages' is a required property")
        if self.engine is not None:
            self.served += 1
            return 200, json.dumps(await self.engine.answer(body, self.config.model)).encode(), None
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
                await asyncio.sleep(self._latency())
        finally:
            self.in_flight -= 1
        self.admitted.append(now)
        self.served += 1
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return 200, json.dumps(data).encode(), self.window.headers(now) if self.config.ratelimit_headers else None

    def strict_refusal(self, body: dict[str, Any]) -> tuple[int, bytes, None] | None:
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

    async def stub_chat(self, request: web.Request) -> web.Response:
        """``stub=True``: answered at once, nothing but ``served`` counted."""
        body = await request.read()
        self.served += 1
        return web.Response(body=stub_answer(body, self.config.model), content_type="application/json")

    # ------------------------------------------------------------------------------- proxy
    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, bytes, None]:
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        async with self._client.request(request.method, str(self.config.upstream).rstrip("/") + request.path_qs,
                                        data=body or None, headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.read(), None

    async def _other(self, request: web.Request) -> web.Response:
        status, data, _ = await self._forward(request, await request.read())
        return web.Response(status=status, body=data, content_type="application/json")

    async def closing(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    # ------------------------------------------------------------------------------ routes
    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.config.model, "object": "model", "created": 0, "owned_by": self.config.owned_by}]})

    async def stats_route(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def reset_route(self, _: web.Request) -> web.Response:
        if self.engine is not None:
            self.engine.reset()
        return web.json_response({"ok": True})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.stub_chat if self.config.stub else self.chat)
        if self.config.upstream:  # a proxy: everything else goes upstream untouched
            app.router.add_route("*", "/{tail:.*}", self._other)
            return
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats_route)
        app.router.add_post("/reset", self.reset_route)
        if self._extra_routes is not None:
            self._extra_routes(app, self)

    def routes(self, app: web.Application) -> None:
        self.add_routes(app)


def _rates(text: str) -> dict[str, float]:
    """``--faults``: ``default`` (DEFAULT_FAULTS) or ``fate=rate,...``."""
    if text == "default":
        return dict(DEFAULT_FAULTS)
    return {k: float(v) for k, v in (x.split("=") for x in text.split(",") if x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--max-seconds", type=float, default=3600)
    ap.add_argument("--rpm", type=int)
    ap.add_argument("--tpm", type=int)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--latency-s", type=float, default=0.0)
    ap.add_argument("--cached-tokens", type=int, default=0)
    ap.add_argument("--strict", action="store_true", help="as OpenAI's API: unknown fields refused, n ignored")
    ap.add_argument("--stub", action="store_true", help="the zero-latency stub (benchmarks)")
    ap.add_argument("--slots", type=int, help="a simulated continuous-batching engine of this many slots")
    ap.add_argument("--ms-per-token", type=float, default=2.0)
    ap.add_argument("--median-frac", type=float, default=0.35)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--upstream", help="a proxy in front of this server, e.g. http://127.0.0.1:8000 (no /v1)")
    ap.add_argument("--faults", type=_rates, default={}, help="'default' or fate=rate,... (http_500, http_429, "
                                                              "stall, drop, truncate)")
    ap.add_argument("--stall-s", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    server = FakeServer(FakeConfig(
        model=a.model, max_seconds=a.max_seconds, rpm=a.rpm, tpm=a.tpm, window_s=a.window_s, latency_s=a.latency_s,
        cached_tokens=a.cached_tokens, strict=a.strict, stub=a.stub, slots=a.slots, ms_per_token=a.ms_per_token,
        median_frac=a.median_frac, sigma=a.sigma, upstream=a.upstream, faults=a.faults, stall_s=a.stall_s,
        seed=a.seed)).start(a.port)
    print(f"listening on {server.url.rsplit(':', 1)[1]}", flush=True)
    try:
        server._thread.join(a.max_seconds + 5)
    except KeyboardInterrupt:
        pass
    finally:
        print(json.dumps(server.stats() | ({"faults": dict(server.faults_drawn)} if a.faults else {})), flush=True)
        server.stop()


if __name__ == "__main__":
    main()
