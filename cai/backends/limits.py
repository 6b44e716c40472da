"""How fast one server is sent requests: rate limits given by the user, and concurrency that adapts.

``Limits`` is what ``ServerClient`` passes each try of a request through, before it is sent:

- a concurrency slot: at most ``limit`` requests in flight, where ``limit`` adapts (AIMD): a
  429 or 503 answer halves it (once per round of requests: answers to requests sent before the
  last cut do not cut again), each answer that succeeds while it is below ``concurrency`` adds
  ``1 / limit`` (one slot per round of answers), and it never goes above ``concurrency`` or below
  1. A ``Retry-After`` on a 429/503 also holds every new request to this server until then (the
  server said when it has room: the others would only be refused too). On a server that never
  refuses, this is a plain semaphore of ``concurrency``.
- ``rpm`` / ``tpm`` (when given): token buckets (``Bucket``) filled at 95% of the limit per
  minute, spread evenly (no burst, so a provider's sliding window, of a minute or of a second,
  is not crossed); a request costs 1 of ``rpm`` and, of
  ``tpm``, its prompt tokens estimated from the rendered messages (4 characters a token, 4
  tokens a message) plus ``max_tokens`` for each of ``n`` samples; when the answer comes, the
  bucket is corrected by the server's ``usage`` (a refused request costs nothing).
- a pace, without ``rpm``/``tpm``, learnt from the first 429: concurrency alone cannot bound a
  rate when answers are fast. It starts from the server's ``x-ratelimit-*`` headers when it sends
  them (``(limit - remaining) / reset`` of requests, and of tokens over the tokens an answer
  uses), else from the rate answers succeeded at over the last ``RECENT_S`` seconds; then AIMD on
  the rate: each new round of 429s multiplies it by ``PACE_BACKOFF``, each answer that succeeds
  adds ``step / rate`` (``step``: ``PACE_GROW`` of the rate at the last cut, per second). New
  requests go at the pace (a ``Bucket``), so when a ``Retry-After`` hold ends they go one by one,
  not all at once. A server that never refuses is never paced.

``Patience`` is how long one request is tried again (a 429 that says when to come back is
waited out rather than counted as a fault). ``describe()`` says what was met, for run.json: the
429s and 503s, the limit the concurrency settled at, its lowest, the seconds requests
waited for the rate limits, and the pace learnt (requests a minute), if any.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from typing import Any

HEADROOM = 0.95  # the rate limits are kept to this share of what was given
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
BACKOFF = 0.5  # the concurrency limit is multiplied by this on a 429 or 503
MAX_HOLD_S = 60.0  # the longest a Retry-After holds new requests
SLACK_S = 0.05  # a rate limit's time not lost to a late wake-up
PATIENCE_S = 600.0  # how long one request waits out 429s that say when to come back
RECENT_S = 5.0  # the pace starts from the rate of the answers that succeeded over this long
PACE_BACKOFF = 0.7  # the pace is multiplied by this on each new round of 429s
PACE_GROW = 0.05  # ... and grows back by this share of the rate at the last cut, per second
MIN_PACE = 0.1  # requests a second: the slowest pace
DENSE = 0.1  # the pace is cut only when the 429s since the last cut are this share of the answers


def estimate_tokens(body: dict[str, Any]) -> int:
    """What a request may cost of a tokens-per-minute limit: its prompt (from the rendered
    messages' characters) plus ``max_tokens`` for each of its ``n`` samples."""
    messages = body.get("messages") or ()
    chars = sum(len(c) if isinstance(c := m.get("content"), str) else len(str(c or "")) for m in messages)
    out = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return -(-chars // CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages) + int(out) * int(body.get("n") or 1)


def retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header's seconds (None for an HTTP date: the client's own backoff then)."""
    seconds = duration(value)
    return None if seconds is None else max(0.0, seconds)


def used_tokens(usage: Any) -> int | None:
    """The tokens an answer's ``usage`` counts (prompt + completion), if it says."""
    if not isinstance(usage, dict):
        return None
    try:
        return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return None


def duration(value: str | None) -> float | None:
    """A ``x-ratelimit-reset-*`` header's seconds: ``1.5``, ``20ms``, ``6m0s``, ``1h2m3.5s``."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parts = re.findall(r"([\d.]+)(ms|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def header_rate(headers: Any, tokens_each: float | None) -> float | None:
    """Requests a second the server's ``x-ratelimit-*`` headers allow: for requests and for
    tokens (over ``tokens_each``, what an answer uses), ``(limit - remaining) / reset`` (what was
    spent, over the time until it is all given back: the rate it is given back at); the lower."""
    rates = []
    for kind, each in (("requests", 1.0), ("tokens", tokens_each)):
        try:
            limit = float(headers.get(f"x-ratelimit-limit-{kind}"))
            spent = limit - float(headers.get(f"x-ratelimit-remaining-{kind}"))
        except (TypeError, ValueError):
            continue
        reset = duration(headers.get(f"x-ratelimit-reset-{kind}"))
        if each and reset and reset > 0 and spent > 0:
            rates.append(spent / reset / each)
    return min(rates) if rates else None


class Patience:
    """How long one request is tried again: ``max_retries`` failed tries, not counting the 429s
    that say when to come back (``Retry-After``): those are waited out, as the server asked, for
    up to ``PATIENCE_S`` from the first failure (a server that refuses without saying when, a
    spent quota say, fails the request as any fault does)."""

    def __init__(self, max_retries: int) -> None:
        self.left = max_retries
        self.since = time.monotonic()

    def over(self, failure: BaseException | None) -> bool:
        """Whether this failed try ends the request (``failure``: what it raised; an HTTP answer's
        has its ``status`` and ``retry_after``)."""
        status, after = getattr(failure, "status", None), getattr(failure, "retry_after", None)
        if status == 429 and after is not None and time.monotonic() - self.since < PATIENCE_S:
            return False
        self.left -= 1
        return self.left < 0


class Bucket:
    """A rate of ``per_minute`` units (at ``HEADROOM``), spread evenly: a request goes once its
    cost is paid for, at ``rate`` from when the ones before it were (``paid_at``, on the monotonic
    clock; at most ``SLACK_S`` back when it comes, lest a late wake-up lose time). So in any
    window of ``w`` seconds at most ``rate * (w + SLACK_S)`` go: under the limit for any window of
    a second or more. ``take`` waits in turn (first come, first served); ``give`` takes back part
    of a cost (the answer cost less than estimated: the one waiting goes sooner), or adds to it."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute * HEADROOM / 60  # per second
        self.paid_at = 0.0
        self.waited = 0.0  # seconds spent waiting, summed over requests
        self._turn = asyncio.Lock()
        self._given = asyncio.Event()

    async def take(self, cost: float) -> None:
        async with self._turn:
            start = now = time.monotonic()
            self.paid_at = max(self.paid_at, start - SLACK_S)  # no credit kept from idle time
            while (wait := (due := self.paid_at + cost / self.rate) - now) > 0:
                self._given.clear()
                with contextlib.suppress(TimeoutError):  # woken early when a cost is given back
                    await asyncio.wait_for(self._given.wait(), wait)
                now = time.monotonic()
            self.waited += now - start
            self.paid_at = due

    def give(self, amount: float) -> None:
        self.paid_at -= amount / self.rate
        if amount > 0:
            self._given.set()


class Limits:
    """Concurrency (adaptive, at most ``concurrency``) and the rate limits of one server."""

    def __init__(self, concurrency: int, rpm: int | None = None, tpm: int | None = None) -> None:
        self.ceiling = max(1, concurrency)
        self.limit = float(self.ceiling)
        self.lowest = self.ceiling
        self.rpm, self.tpm = rpm, tpm
        self.requests = Bucket(rpm) if rpm else None
        self.tokens = Bucket(tpm) if tpm else None
        self.in_flight = 0
        self.cuts = 0  # times the limit was cut: a try sent before the last cut does not cut it again
        self.refused: dict[int, int] = {429: 0, 503: 0}
        self.hold_until = 0.0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.pace: Bucket | None = None  # learnt from the first 429 when no rate limit is given
        self.step = 0.0  # requests a second the pace grows by, per second
        self.since_cut = [0, 0]  # answers and 429s since the pace was last cut
        self.recent: deque[float] = deque()  # when answers succeeded, over the last RECENT_S (unpaced)
        self.tokens_each: float | None = None  # the tokens an answer uses (a running mean)

    # ----------------------------------------------------------------------------- a slot
    async def enter(self, body: dict[str, Any]) -> tuple[int, int]:
        """Wait for a slot, a ``Retry-After`` hold, and the rate limits: ``(cuts so far, tokens
        taken)``, to be given to ``leave``."""
        if self._waiters or self.in_flight >= int(self.limit):
            await self._queue()
        else:
            self.in_flight += 1
        try:
            if self.hold_until and (hold := self.hold_until - time.monotonic()) > 0:
                await asyncio.sleep(hold)
            if self.requests is not None:
                await self.requests.take(1)
            elif self.pace is not None:
                await self.pace.take(1)
            cost = 0
            if self.tokens is not None:
                cost = estimate_tokens(body)
                await self.tokens.take(cost)
        except BaseException:  # cancelled while waiting
            self._release()
            raise
        return self.cuts, cost

    def leave(self, ticket: tuple[int, int], status: int, used: int | None = None,
              retry_after: float | None = None, headers: Any = None) -> None:
        """A try is over: ``status`` 0 when no answer came; ``used``: the tokens the answer's
        ``usage`` counts (prompt + completion), when it says; ``headers``: the answer's (a 429's
        ``x-ratelimit-*`` set the pace)."""
        cuts, cost = ticket
        self._release()
        if status in (429, 503):
            self.refused[status] += 1
            self.since_cut[1] += status == 429
            if retry_after:
                self.hold_until = max(self.hold_until, time.monotonic() + min(retry_after, MAX_HOLD_S))
            if cuts == self.cuts:  # the first refusal of this round: cut once
                self.cuts += 1
                if self.pace is None or status == 503:  # paced: the pace bounds the rate, not this
                    self.limit = max(1.0, self.limit * BACKOFF)
                    self.lowest = min(self.lowest, int(self.limit))
                if status == 429 and self.requests is None and self.tokens is None:
                    self._slow_down(headers)
        elif status == 200:
            if self.limit < self.ceiling:
                self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)
                self._wake()
            if self.requests is None and self.tokens is None:
                self._succeeded(used)
        if self.tokens is not None and cost:
            if status == 200 and used is not None:
                self.tokens.give(cost - used)
            elif status == 429 or 400 <= status < 500:  # refused: the server counted nothing
                self.tokens.give(cost)

    # --------------------------------------------------------------------------- the pace
    def _succeeded(self, used: int | None) -> None:
        if used:
            self.tokens_each = used if self.tokens_each is None else 0.9 * self.tokens_each + 0.1 * used
        if self.pace is not None:
            self.pace.rate += self.step / self.pace.rate
            self.since_cut[0] += 1
        now = time.monotonic()
        self.recent.append(now)
        while self.recent[0] < now - RECENT_S:
            self.recent.popleft()

    def _slow_down(self, headers: Any) -> None:
        """A new round of 429s: the pace is learnt (the headers', else the recent answers' rate)
        or cut."""
        told = header_rate(headers, self.tokens_each) if headers is not None else None
        now = time.monotonic()
        seen = sum(1 for t in self.recent if t >= now - RECENT_S)
        served = seen / max(1.0, now - self.recent[0]) if self.recent else 0.0  # what the server took
        if self.pace is None and told is None and not self.recent:
            return  # nothing answered yet to learn a rate from: the concurrency cut and any hold do
        if self.pace is None:
            rate = told or (seen + self.in_flight) / max(1.0, now - self.recent[0] if self.recent else 0.0)
            self.pace = Bucket(60 * max(MIN_PACE, rate) / HEADROOM)
            self.pace.paid_at = max(now, self.hold_until) - 1 / self.pace.rate  # the next goes after the hold
        elif self.since_cut[1] < max(2, DENSE * self.since_cut[0]):  # stray 429s: no cut (no spiral down)
            return
        else:  # cut, but not below what the server answered of late (a full window refuses any pace)
            cut = max(self.pace.rate * PACE_BACKOFF, HEADROOM * served)
            self.pace.rate = max(MIN_PACE, min(cut, self.pace.rate, told) if told else min(cut, self.pace.rate))
        self.step, self.since_cut = PACE_GROW * self.pace.rate / PACE_BACKOFF, [0, 0]

    def _release(self) -> None:
        self.in_flight -= 1
        if self._waiters:
            self._wake()

    async def _queue(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # given a slot just as it was cancelled
                self._release()
            raise

    def _wake(self) -> None:
        while self._waiters and self.in_flight < int(self.limit):
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(None)

    # ---------------------------------------------------------------------------- reports
    def describe(self) -> dict[str, Any]:
        """``rpm``, ``tpm`` (as given), ``concurrency`` (the most), ``settled_at`` (the adaptive
        limit now), ``lowest``, ``http_429``/``http_503`` (refusals met), ``rate_wait_s``,
        ``paced_at`` (the pace learnt, requests a minute; None: never paced)."""
        return {"rpm": self.rpm, "tpm": self.tpm, "concurrency": self.ceiling, "settled_at": int(self.limit),
                "lowest": self.lowest, "http_429": self.refused[429], "http_503": self.refused[503],
                "rate_wait_s": round(sum(b.waited for b in (self.requests, self.tokens) if b is not None), 3),
                "paced_at": None if self.pace is None else round(60 * self.pace.rate)}
