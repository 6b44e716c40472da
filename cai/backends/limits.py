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

``Patience`` is how long one request is tried again (a 429 that says when to come back is
waited out rather than counted as a fault). ``describe()`` says what was met, for run.json: the
429s and 503s, the limit the concurrency settled at, its lowest, and the seconds requests
waited for the rate limits.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def estimate_tokens(body: dict[str, Any]) -> int:
    """What a request may cost of a tokens-per-minute limit: its prompt (from the rendered
    messages' characters) plus ``max_tokens`` for each of its ``n`` samples."""
    messages = body.get("messages") or ()
    chars = sum(len(c) if isinstance(c := m.get("content"), str) else len(str(c or "")) for m in messages)
    out = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return -(-chars // CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages) + int(out) * int(body.get("n") or 1)


def retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header's seconds (None for an HTTP date: the client's own backoff then)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def used_tokens(usage: Any) -> int | None:
    """The tokens an answer's ``usage`` counts (prompt + completion), if it says."""
    if not isinstance(usage, dict):
        return None
    try:
        return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return None


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
            cost = 0
            if self.tokens is not None:
                cost = estimate_tokens(body)
                await self.tokens.take(cost)
        except BaseException:  # cancelled while waiting
            self._release()
            raise
        return self.cuts, cost

    def leave(self, ticket: tuple[int, int], status: int, used: int | None = None,
              retry_after: float | None = None) -> None:
        """A try is over: ``status`` 0 when no answer came; ``used``: the tokens the answer's
        ``usage`` counts (prompt + completion), when it says."""
        cuts, cost = ticket
        self._release()
        if status in (429, 503):
            self.refused[status] += 1
            if retry_after:
                self.hold_until = max(self.hold_until, time.monotonic() + min(retry_after, MAX_HOLD_S))
            if cuts == self.cuts:  # the first refusal of this round: cut once
                self.cuts += 1
                self.limit = max(1.0, self.limit * BACKOFF)
                self.lowest = min(self.lowest, int(self.limit))
        elif status == 200 and self.limit < self.ceiling:
            self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)
            self._wake()
        if self.tokens is not None and cost:
            if status == 200 and used is not None:
                self.tokens.give(cost - used)
            elif status == 429 or 400 <= status < 500:  # refused: the server counted nothing
                self.tokens.give(cost)

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
    def waited(self) -> float:
        return sum(b.waited for b in (self.requests, self.tokens) if b is not None)

    def describe(self) -> dict[str, Any]:
        """``rpm``, ``tpm`` (as given), ``concurrency`` (the most), ``settled_at`` (the adaptive
        limit now), ``lowest``, ``http_429``/``http_503`` (refusals met), ``rate_wait_s``."""
        return {"rpm": self.rpm, "tpm": self.tpm, "concurrency": self.ceiling, "settled_at": int(self.limit),
                "lowest": self.lowest, "http_429": self.refused[429], "http_503": self.refused[503],
                "rate_wait_s": round(self.waited(), 3)}
