"""Several OpenAI-compatible servers behind one backend: ``--base-url A --base-url B``.

One ``OpenAIServerBackend`` per server does the talking (its dialect detection, retries and
fault handling, unchanged); this backend only chooses the server of each request and keeps the
servers that fail out of rotation.

Routing: a request goes to the server in rotation with the fewest requests in flight from this
backend (ties: the one sent fewer so far), except that a row's later calls (same
``Request.affinity``) go to the server its first call went to while that server is in rotation,
so the server's prefix cache still holds the row's earlier turns. The row-to-server map is an
LRU bounded by ``affinity_limit`` entries (rows in progress number at most the concurrency).

Health: a server is taken out of rotation when a call to it fails for the server's sake (it
cannot be connected to, or the client's retries ran out: 5xx, 429, timeouts, dropped
connections: a ``server`` or ``unreachable`` failure), and when its client starts retrying (its
``retries`` counts grow) and a quick ``GET /models`` then fails. The requests in flight to it,
and later ones, go to the other servers. It is probed again after a backoff (``down_min``
seconds, doubled for each outage in a row, at most ``down_max``): a one-token chat completion
that must answer 200 before the server is put back. When every server is out of rotation, a
request waits for one to come back, at most ``all_down_wait`` seconds from when the last one
went (so a dead cluster costs one wait, not one per row), then fails with an error
``Completion`` that names every server and its last failure: the row goes to the failures file,
and a rerun retries it.

What a request is (messages, sampling) is untouched, and the answer is the one server's answer:
the call cache, resume and exactly-once writing are the runner's, as with one server.
``describe()`` (for run.json) adds ``servers``: per server, calls answered, failures, outages
and time out of rotation.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import runtime
from ..errors import BackendError
from ..types import Completion, Request
from .openai_server import START_HINT, OpenAIServerBackend, model_ids
from .urls import split_urls

TICK_S = 0.1  # how often the health monitor looks at the servers
LIVENESS_EVERY_S = 1.0  # at most one liveness check a second per server (a 429 storm retries a lot)


def server_fault(c: Completion) -> bool:
    """Whether a failed answer is the server's fault (retries ran out, or unreachable), not the request's."""
    return c.failure is not None and c.failure.kind != "request"


@dataclass(eq=False)
class _Server:
    index: int
    url: str
    client: OpenAIServerBackend
    gone: asyncio.Future[None]  # resolved when the server is taken out of rotation
    in_flight: int = 0
    sent: int = 0
    answered: int = 0
    errors: int = 0  # answered with an error that is the request's (a 400, say)
    failures: int = 0  # calls that failed for the server's sake
    rerouted: int = 0  # calls in flight when it went out of rotation, sent elsewhere
    outages: int = 0
    epoch: int = 0  # times put back in rotation
    level: int = 0  # outages in a row (backoff exponent)
    down_since: float | None = None
    down_total: float = 0.0
    up_since: float = field(default_factory=time.monotonic)
    next_probe: float = 0.0
    last_probe: float = 0.0
    probe: asyncio.Task[None] | None = None  # the probe or liveness check under way
    retries_seen: int = 0
    last_failure: str | None = None

    @property
    def up(self) -> bool:
        return self.down_since is None


class MultiServerBackend:
    """One backend over several OpenAI-compatible servers serving the same model.

    Takes what ``OpenAIServerBackend`` takes (``base_url``: the list of server URLs; each server
    gets a client with the other settings), plus the routing and health settings. Everything
    runs on the run's loop: the routing, the health monitor (a task started with the backend)
    and every server's client.
    """

    model_id: str

    def __init__(self, model: str | None = None, base_url: Sequence[str] = (), *, affinity: bool = True,
                 affinity_limit: int | None = None, probe_timeout: float = 10.0, down_min: float = 1.0,
                 down_max: float = 60.0, all_down_wait: float = 30.0, **client: Any) -> None:
        urls = split_urls(base_url)
        if not urls:
            raise BackendError("no server URL (--base-url)")  # each is checked as its client is made
        self.urls = urls
        self.concurrency = max(1, client.get("concurrency", 256))
        self.affinity = affinity
        self.affinity_limit = affinity_limit or max(4096, 16 * self.concurrency)
        self.probe_timeout, self.down_min, self.down_max = probe_timeout, down_min, down_max
        self.all_down_wait = all_down_wait
        self._client_kw = client  # OpenAIServerBackend's settings: each server gets its own client (and limits)
        self._servers: list[_Server] = []
        self._rows: OrderedDict[str, int] = OrderedDict()
        self._routing: Counter[str] = Counter()
        self._monitor: asyncio.Task[None] | None = None
        self._any_up: asyncio.Future[None] | None = None  # resolved when one comes back, while all are down
        self._all_down_since: float | None = None
        try:
            runtime.run(self._start(model))
        except BaseException:
            runtime.run(self.aclose())
            raise

    # ----------------------------------------------------------------------------------- API
    @property
    def servers(self) -> list[dict[str, Any]]:
        """Per server, in the order given: ``url``, ``in_rotation`` (now), ``sent`` (calls sent to it),
        ``answered`` (calls it answered, ``errors`` of them with an error that is the request's own: a 400, say),
        ``failures`` (calls that failed there for the server's sake: unreachable, retries run
        out), ``rerouted`` (calls in flight when it went out of rotation, sent elsewhere),
        ``outages`` (times taken out of rotation), ``out_of_rotation_s``, ``last_failure``,
        and its client's ``retries``, ``server_kind`` and ``limits`` (``limits.Limits.describe``)."""
        now = time.monotonic()
        return [{"url": s.url, "in_rotation": s.up, "sent": s.sent, "answered": s.answered, "errors": s.errors,
                 "failures": s.failures, "rerouted": s.rerouted, "outages": s.outages, "out_of_rotation_s":
                 round(s.down_total + (now - s.down_since if s.down_since is not None else 0.0), 3),
                 "last_failure": s.last_failure,
                 "retries": s.client.retries, "server_kind": s.client.server_kind,
                 "limits": s.client.client.limits.describe()} for s in self._servers]

    @property
    def routing(self) -> dict[str, Any]:
        """``affinity`` (on or off), ``affinity_kept`` (calls sent to their row's server),
        ``affinity_moved`` (calls whose row's server was out of rotation), ``all_down`` (calls
        failed because every server was out of rotation)."""
        return {"affinity": self.affinity, "affinity_kept": self._routing["kept"],
                "affinity_moved": self._routing["moved"], "all_down": self._routing["all_down"]}

    def describe(self) -> dict[str, Any]:
        """What ``OpenAIServerBackend.describe()`` gives, merged over the servers, plus ``servers`` and
        ``routing``, for run.json: ``server_kind`` "mixed" when they differ; a capability False if any
        server lacks it, True if one was seen to have it, else None; ``notes``, ``retries`` and the
        refusals and waits of ``limits`` summed, with the concurrency each settled at and the lowest."""
        clients = [s.client for s in self._servers]
        kinds = {c.server_kind for c in clients} - {"unknown"}
        caps: dict[str, bool | None] = {}
        for c in clients:
            for k, v in c.capabilities.items():
                prev = caps.get(k)
                caps[k] = False if False in (v, prev) else (True if True in (v, prev) else None)
        each = [c.client.limits.describe() for c in clients]
        limits = {**each[0], "settled_at": [d["settled_at"] for d in each], "lowest": min(d["lowest"] for d in each),
                  "http_429": sum(d["http_429"] for d in each), "http_503": sum(d["http_503"] for d in each),
                  "rate_wait_s": round(sum(d["rate_wait_s"] for d in each), 3),
                  "paced_at": [d["paced_at"] for d in each] if any(d["paced_at"] for d in each) else None}
        return {"server": self._client_kw.get("server", "auto"),
                "server_kind": kinds.pop() if len(kinds) == 1 else ("unknown" if not kinds else "mixed"),
                "capabilities": caps, "notes": dict(sum((Counter(c.notes) for c in clients), Counter())),
                "retries": dict(sum((Counter(c.retries) for c in clients), Counter())),
                "limits": limits, "servers": self.servers, "routing": self.routing}

    async def aclose(self) -> None:
        tasks = [t for t in (self._monitor, *(s.probe for s in self._servers)) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in self._servers:
            await s.client.aclose()

    # ------------------------------------------------------------------------------ routing
    def _pick(self, request: Request, tried: dict[int, int]) -> _Server | None:
        def eligible(s: _Server) -> bool:
            return s.up and tried.get(s.index) != s.epoch

        row = request.affinity if self.affinity else None
        if row is not None and (i := self._rows.get(row)) is not None:
            s = self._servers[i]
            if eligible(s):
                self._rows.move_to_end(row)
                self._routing["kept"] += 1
                return s
            self._routing["moved"] += 1
        candidates = [s for s in self._servers if eligible(s)]
        if not candidates:
            return None
        best = min(candidates, key=lambda s: (s.in_flight, s.sent, s.index))
        if row is not None:
            self._remember(row, best)
        return best

    def _remember(self, row: str, s: _Server) -> None:
        self._rows[row] = s.index
        self._rows.move_to_end(row)
        while len(self._rows) > self.affinity_limit:
            self._rows.popitem(last=False)

    async def generate(self, request: Request) -> Completion:
        """One request, to one server (another one if that one fails); never raises for it."""
        tried: dict[int, int] = {}  # server -> its epoch when tried (a server back in rotation may be tried again)
        last: Completion | None = None
        for _ in range(4 * len(self._servers) + 4):  # bounded: each pass tries a server or waits once
            s = self._pick(request, tried)
            if s is None:
                if any(s.up for s in self._servers):  # every server in rotation was tried
                    break
                if not await self._wait_for_one():
                    break
                continue
            tried[s.index] = s.epoch
            c = await self._send(s, request)
            if c is None:  # failed there for the server's sake, or moved off it: next server
                continue
            if server_fault(c):
                s.failures += 1
                self._take_down(s, c.error or "")
                last = c
                continue
            s.answered += 1
            s.errors += c.failure is not None
            if request.affinity is not None and self.affinity:
                self._remember(request.affinity, s)
            return c
        if not any(s.up for s in self._servers):
            self._routing["all_down"] += 1
            return Completion.failed("server", self._all_down_message(last))
        return last or Completion.failed("server", "no server could answer this request")

    async def _send(self, s: _Server, request: Request) -> Completion | None:
        """``request`` to server ``s``: its answer, or None when ``s`` could not be reached (now
        out of rotation) or went out of rotation while the request was in flight."""
        s.in_flight += 1
        s.sent += 1
        gone = s.gone
        task = asyncio.ensure_future(s.client.generate(request))
        try:
            await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            s.in_flight -= 1
            moved = not task.done()
            if moved:  # the server went out of rotation, or the run stops: stop the request there
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if moved:
            s.rerouted += 1
            return None
        c = task.result()
        if c.failure is not None and c.failure.kind == "unreachable":
            s.failures += 1
            self._take_down(s, c.failure.message)
            return None
        return c

    # ------------------------------------------------------------------------------- health
    def _take_down(self, s: _Server, reason: str) -> None:
        s.last_failure = " ".join(reason.split())[:300] or "failed"
        if not s.up:
            return
        now = time.monotonic()
        if now - s.up_since > self.down_max:  # up a long while: not one outage in a row
            s.level = 0
        s.down_since = now
        s.outages += 1
        s.last_probe = now
        s.next_probe = now + min(self.down_max, self.down_min * 2 ** s.level)
        s.level += 1
        gone, s.gone = s.gone, asyncio.get_running_loop().create_future()
        gone.set_result(None)  # the requests in flight there move on
        if not any(x.up for x in self._servers):
            self._all_down_since = now
            if self._any_up is None or self._any_up.done():
                self._any_up = asyncio.get_running_loop().create_future()

    def _put_back(self, s: _Server) -> None:
        if s.up:
            return
        now = time.monotonic()
        assert s.down_since is not None
        s.down_total += now - s.down_since
        s.down_since = None
        s.up_since = now
        s.epoch += 1
        s.retries_seen = sum(s.client.retries.values())
        self._all_down_since = None
        if self._any_up is not None and not self._any_up.done():
            self._any_up.set_result(None)

    async def _wait_for_one(self) -> bool:
        """Every server is out of rotation: wait until one is back (True), at most until
        ``all_down_wait`` seconds after the last one went (False)."""
        since = self._all_down_since if self._all_down_since is not None else time.monotonic()
        left = since + self.all_down_wait - time.monotonic()
        if left <= 0 or self._any_up is None:
            return False
        done, _ = await asyncio.wait({self._any_up}, timeout=left)
        return bool(done)

    def _all_down_message(self, last: Completion | None) -> str:
        now = time.monotonic()
        each = "; ".join(f"{s.url}: {s.last_failure or 'failed'} (next probe in {max(0.0, s.next_probe - now):.0f} s)"
                         for s in self._servers)
        msg = f"all {len(self._servers)} servers are out of rotation: {each}"
        return msg + (f"; this request's last error: {last.error}" if last is not None and last.error else "")

    async def _watch(self) -> None:
        """The health monitor: a server in rotation whose client started retrying gets a quick
        ``GET /models``; a server out of rotation is probed when its backoff is over (sooner
        while requests wait because all are out)."""
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            waiting = self._any_up is not None and not self._any_up.done()
            for s in self._servers:
                if s.probe is not None and not s.probe.done():
                    continue
                if s.up:
                    n = sum(s.client.retries.values())
                    if n > s.retries_seen and now - s.last_probe >= LIVENESS_EVERY_S:
                        s.retries_seen = n
                        s.probe = asyncio.ensure_future(self._check_alive(s))
                elif now >= s.next_probe or (waiting and now >= s.last_probe + self.down_min):
                    s.probe = asyncio.ensure_future(self._probe(s))

    async def _check_alive(self, s: _Server) -> None:
        s.last_probe = time.monotonic()
        ok, why = await s.client.client.alive(self.probe_timeout)
        if not ok and s.up:
            self._take_down(s, f"not answering: {why}")

    async def _probe(self, s: _Server) -> None:
        """Before a server goes back in rotation: a one-token chat completion must answer 200."""
        s.last_probe = time.monotonic()
        ok, why = await s.client.client.ping(self.model_id, self.probe_timeout)
        if ok:
            self._put_back(s)
            return
        now = time.monotonic()
        s.last_failure = why
        s.next_probe = now + min(self.down_max, self.down_min * 2 ** s.level)
        s.level += 1

    # ------------------------------------------------------------------------------ plumbing
    async def _start(self, model: str | None) -> str:
        """Clients for every server; each server's model listing read at once (a server that does
        not answer starts out of rotation); the model is the first listing's unless named."""
        clients = [OpenAIServerBackend(model=model or "?", base_url=u, **self._client_kw) for u in self.urls]
        listings = await asyncio.gather(*(c.client.models(timeout=self.probe_timeout) for c in clients))
        if model is not None and not any(ok for ok, _, _ in listings):  # no model listing: do they chat?
            pings = await asyncio.gather(*(c.client.ping(model, self.probe_timeout) for c in clients))
            listings = [(ok, why if ok else f"{why0}; {why}", None)
                        for (ok, why), (_, why0, _) in zip(pings, listings, strict=True)]
        answered = [(u, data) for u, (ok, _, data) in zip(self.urls, listings, strict=True) if ok]
        for i, (u, c) in enumerate(zip(self.urls, clients, strict=True)):  # closed with the backend
            self._servers.append(_Server(i, u, c, asyncio.get_running_loop().create_future()))
        if not answered:
            why = "; ".join(f"{u}: {w}" for u, (_, w, _) in zip(self.urls, listings, strict=True))
            raise BackendError(f"none of the {len(self.urls)} servers answers: {why}. {START_HINT}")
        if model is None:
            first = model_ids(answered[0][1])
            if not first:
                raise BackendError(f"{answered[0][0]}/models lists no model; pass --model")
            model = first[0]
        for u, data in answered:
            ids = model_ids(data)
            if ids and model not in ids:
                raise BackendError(f"{u} does not serve model {model!r} (it lists {', '.join(ids[:5])}): "
                                   "every --base-url must serve the same model")
        for s, (ok, why, _) in zip(self._servers, listings, strict=True):
            s.client.model_id = model
            if not ok:
                self._take_down(s, f"not answering at start: {why}")
        self.model_id = model
        self._monitor = asyncio.ensure_future(self._watch())
        return model


def servers_summary(servers: Sequence[dict[str, Any]]) -> list[str]:
    """One line per server of ``describe()["servers"]``, for the end summary: the calls it
    answered, what failed there, and its time out of rotation."""
    lines = []
    for s in servers:
        line = f"{s['url']}: {s['answered']} calls answered"
        if s.get("failures"):
            line += f", {s['failures']} failed there"
        if s.get("rerouted"):
            line += f", {s['rerouted']} moved to another server"
        if s.get("outages"):
            times = "once" if s["outages"] == 1 else f"{s['outages']} times"
            line += (f"; out of rotation {times}, {s['out_of_rotation_s']:.1f} s in all"
                     f" (last: {s.get('last_failure') or 'failed'})")
        if not s.get("in_rotation", True):
            line += "; out of rotation at the end"
        lines.append(line)
    return lines
