"""Rate limits (``--rpm``/``--tpm``) and adaptive concurrency (AIMD on 429/503) against a server
that enforces an RPM and a TPM limit with 429 + Retry-After (tests/fake_server.py).

The fake server counts its limits over a sliding window, as providers do, but a short one (1-2 s
instead of 60: ``rpm * window_s / 60`` requests per window) so that each test runs past several
windows in a few seconds: a client that only bursts the first window cannot pass.

- with ``rpm`` (or ``tpm``) set to the server's limit: no 429 is met, and the throughput measured
  by the server over more than two windows is at least 0.9 of the limit;
- with no limits set: the client meets 429s, backs off (its concurrency is cut, then grows back)
  and every request is answered; throughput, measured conservatively (answers / (span + one
  window): what even a perfect client could get over that span), is at least 0.5 of the limit;
- ``cai run`` end to end, with ``--rpm`` and without: the summary line and run.json say what
  happened, and no row fails;
- the limiter and AIMD as units.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from cai.backends import make_backend
from cai.backends.limits import HEADROOM, SLACK_S, Bucket, Limits, duration, estimate_tokens, header_rate
from cai.backends.openai_server import OpenAIServerBackend
from cai.types import Message, Request, Sampling
from tests.fake_server import MODEL, FakeConfig, FakeServer, RouteServer, answer
from tests.sync import Sync

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "examples" / "hh_red_team.jsonl"


def requests(n: int, max_tokens: int = 64) -> list[Request]:
    return [Request((Message(role="user", content=f"Question {i}: " + "how do rate limits work? " * 8),),
                    Sampling(max_tokens=max_tokens)) for i in range(n)]


def run_requests(server: FakeServer, n: int, **limits: int) -> tuple[list, dict, float]:
    be = Sync(OpenAIServerBackend(model=server.config.model, base_url=server.base_url, **limits))
    try:
        t0 = time.monotonic()
        out = be.complete(requests(n))
        return out, be.describe(), time.monotonic() - t0
    finally:
        be.close()


def span(server: FakeServer) -> float:
    return max(server.admitted) - min(server.admitted)


# ----------------------------------------------------------------------- against the server
def test_rpm_set_meets_no_429_and_keeps_near_the_limit() -> None:
    with FakeServer(FakeConfig(rpm=1200, window_s=2.0)) as server:  # 40 requests per 2 s window
        out, desc, _ = run_requests(server, 100, rpm=1200)
    assert all(c.failure is None for c in out)
    assert server.refused_429 == 0 and desc["limits"]["http_429"] == 0 and desc["retries"] == {}
    assert span(server) > 2 * server.config.window_s  # measured past the first window's burst
    rpm = server.throughput()
    assert 0.9 * 1200 <= rpm <= 1200, rpm
    assert desc["limits"]["rpm"] == 1200 and desc["limits"]["rate_wait_s"] > 3


def test_tpm_set_meets_no_429_and_keeps_near_the_limit() -> None:
    # each request: ~70 prompt + 9 completion tokens served, estimated at ~70 + 64 (max_tokens)
    # before it is sent: the answers' usage gives the difference back
    with FakeServer(FakeConfig(tpm=60_000, window_s=2.0)) as server:  # 2,000 tokens per 2 s window
        out, desc, _ = run_requests(server, 100, tpm=60_000)
    assert all(c.failure is None for c in out)
    assert server.refused_429 == 0 and desc["limits"]["http_429"] == 0
    assert span(server) > 2 * server.config.window_s
    tokens = server.prompt_tokens + server.completion_tokens
    first = tokens / server.served  # every request costs the same here: leave the first one's out
    tpm = 60 * (tokens - first) / span(server)
    assert 0.9 * 60_000 <= tpm <= 60_000, tpm


def test_rpm_applies_per_server_with_several_base_urls() -> None:
    """Two servers, each with its own RPM: `--rpm` is each server's, so the run gets both."""
    with FakeServer(FakeConfig(rpm=1200, window_s=2.0)) as a, FakeServer(FakeConfig(rpm=1200, window_s=2.0)) as b:
        be = Sync(make_backend("openai", model=MODEL, base_url=[a.base_url, b.base_url], rpm=1200))
        try:
            out = be.complete(requests(180))
            desc = be.describe()
        finally:
            be.close()
    assert all(c.failure is None for c in out)
    assert a.refused_429 == b.refused_429 == 0 and a.served + b.served == 180
    for s in (a, b):
        assert span(s) > 2 * s.config.window_s and s.throughput() >= 0.9 * 1200, s.throughput()
    assert [s["limits"]["rpm"] for s in desc["servers"]] == [1200, 1200] and desc["limits"]["http_429"] == 0


def test_no_limits_set_backs_off_and_every_request_is_answered() -> None:
    with FakeServer(FakeConfig(rpm=1200, window_s=1.0)) as server:  # 20 requests per 1 s window
        out, desc, _ = run_requests(server, 100)
    failed = [c.error for c in out if c.failure is not None]
    assert not failed, failed[:3]
    lim = desc["limits"]
    assert server.refused_429 > 0 and lim["http_429"] == server.refused_429  # it met the limit, and says so
    assert lim["settled_at"] < lim["concurrency"] == 256 and lim["lowest"] <= lim["settled_at"]
    conservative = 60 * server.served / (span(server) + server.config.window_s)
    assert conservative >= 0.5 * 1200, conservative


@pytest.mark.parametrize("latency_s,rows,headers", [(0.0, 100, False), (0.3, 300, False), (0.0, 300, True)])
def test_no_limits_set_learns_a_pace_and_stops_hammering(latency_s: float, rows: int, headers: bool) -> None:
    """After the first burst (every row at once: what the window does not hold is refused, before
    any answer can say so), the client paces itself near the limit (learnt from the answers, or
    from the x-ratelimit-* headers) instead of meeting 429s again and again: before the pace, 0.8
    to 1.9 more 429s per answer (Retry-Afters ending all at once); with it, 0.13-0.22."""
    cfg = FakeConfig(rpm=1200, window_s=1.0, latency_s=latency_s, ratelimit_headers=headers)  # 20 a window
    with FakeServer(cfg) as server:
        out, desc, _ = run_requests(server, rows)
    assert all(c.failure is None for c in out) and server.served == rows
    burst = min(rows, 256) - 20  # refused in the first round, whatever the client does after
    assert (server.refused_429 - burst) / server.served <= 0.5, server.refused_429  # 0.8-1.9 without the pace
    conservative = 60 * server.served / (span(server) + server.config.window_s)
    assert conservative >= 0.5 * 1200, conservative
    lim = desc["limits"]
    assert lim["paced_at"] is not None and 0.5 * 1200 <= lim["paced_at"] <= 1.5 * 1200, lim


def test_ratelimit_headers_give_the_rate_they_are_given_back_at() -> None:
    assert [duration(v) for v in ("1.5", "20ms", "6m0s", "1h2m3.5s", "1.250s", "soon", None)] == \
        [1.5, 0.02, 360.0, 3723.5, 1.25, None, None]
    h = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0",
         "x-ratelimit-reset-requests": "1m0s"}
    assert header_rate(h, None) == pytest.approx(500 / 60)
    h |= {"x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "60s"}
    assert header_rate(h, 100.0) == pytest.approx(5.0)  # 500 tokens a second, 100 an answer: the lower
    assert header_rate({}, 100.0) is None


def test_server_that_never_refuses_keeps_full_concurrency() -> None:
    with FakeServer(FakeConfig(latency_s=0.5)) as server:
        out, desc, _ = run_requests(server, 200)
    assert all(c.failure is None for c in out) and server.served == 200
    assert desc["limits"] == {"rpm": None, "tpm": None, "concurrency": 256, "settled_at": 256, "lowest": 256,
                              "http_429": 0, "http_503": 0, "rate_wait_s": 0, "paced_at": None}
    assert server.max_in_flight >= 100  # all of them in flight at once (0.5 s each), none held back


@pytest.mark.parametrize("retry_after,answered", [("0.01", True), (None, False)])
def test_429_saying_when_is_waited_out_beyond_max_retries(retry_after: str | None, answered: bool) -> None:
    """8 refusals in a row, max_retries=2: with Retry-After they are waited out (the server said
    when); without, they are faults like any other, and the request fails after 3 tries. With no
    answer before them there is no rate to learn a pace from: the request is not held to the
    slowest pace (10 s between tries)."""
    refusals = iter(range(8))

    def routes(app: web.Application) -> None:
        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            if next(refusals, None) is not None:
                headers = {"Retry-After": retry_after} if retry_after else None
                return web.json_response({"error": {"message": "slow down"}}, status=429, headers=headers)
            return web.json_response(answer(body))

        app.router.add_post("/v1/chat/completions", chat)

    with RouteServer(routes) as server:
        be = Sync(OpenAIServerBackend(model=MODEL, base_url=server.base_url, max_retries=2, backoff=0.01))
        try:
            [c] = be.complete(requests(1))
            desc = be.describe()
        finally:
            be.close()
    assert (c.failure is None) == answered, c.error
    assert desc["limits"]["http_429"] == (8 if answered else 3)
    assert desc["limits"]["paced_at"] is None  # nothing answered before: no pace learnt (it was 0.1/s)


# ------------------------------------------------------------------------------ end to end
def cai(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAI_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "cai.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=180)


def test_cai_run_with_and_without_rpm(tmp_path: Path) -> None:
    """`cai run --backend openai --base-url FAKE`: with `--rpm` no 429 is met; without, 429s are
    met and backed off from; either way no row fails, and the summary and run.json say so."""
    common = ["run", "--input", str(PROMPTS), "--limit", "10", "-b", "openai", "--revise-rounds", "1",
              "--label-principles", "1", "--no-progress", "--cache", "off"]
    with FakeServer(FakeConfig(rpm=1200, window_s=2.0)) as server:  # 40 requests per 2 s window
        r = cai(*common, "-o", str(tmp_path / "limited"), "--base-url", server.base_url, "--rpm", "1200")
        assert r.returncode == 0, r.stderr
        assert server.refused_429 == 0 and server.served >= 10 * 4  # more than a window holds
        lim = json.loads((tmp_path / "limited" / "run.json").read_text())["backend"]["limits"]
        assert lim["rpm"] == 1200 and lim["http_429"] == 0 and lim["rate_wait_s"] > 0
        assert "server: --rpm 1200 held requests back" in r.stderr and "429s met" not in r.stderr
        served = server.served

        r = cai(*common, "-o", str(tmp_path / "free"), "--base-url", server.base_url)
        assert r.returncode == 0, r.stderr
        refused = server.refused_429
        assert refused > 0 and server.served == 2 * served  # the same calls, none failed
        lim = json.loads((tmp_path / "free" / "run.json").read_text())["backend"]["limits"]
        assert lim["rpm"] is None and lim["http_429"] == refused and lim["settled_at"] < 256
        assert f"server: {refused} 429s met; concurrency settled at {lim['settled_at']} of 256" in r.stderr
    for run in ("limited", "free"):
        assert not (tmp_path / run / "revisions.failures.jsonl").exists() or \
            not (tmp_path / run / "revisions.failures.jsonl").read_text().strip()
        assert len((tmp_path / run / "revisions.jsonl").read_text().splitlines()) == 10


# ------------------------------------------------------------------------------------ units
def test_estimate_tokens_counts_the_messages_and_every_samples_max_tokens() -> None:
    body = {"messages": [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 9}],
            "max_tokens": 100, "n": 3}
    assert estimate_tokens(body) == 10 + 3 + 2 * 4 + 3 * 100
    assert estimate_tokens({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5}) == 1 + 4 + 5


def test_bucket_spreads_requests_evenly_at_the_headroom_rate() -> None:
    async def go() -> tuple[list[float], Bucket]:
        b = Bucket(per_minute=6000)  # 100 a second, kept to 95
        t0 = time.monotonic()
        times = []
        for _ in range(40):
            await b.take(1)
            times.append(time.monotonic() - t0)
        return times, b

    times, b = asyncio.run(go())
    rate = 100 * HEADROOM
    assert times[0] < 0.01  # the first goes at once (its cost is within the slack)
    # never above the rate: the k-th unit goes once k + 1 are paid for, less the slack
    # (SLACK_S of the rate, so that a late wake-up loses no time)
    assert all(t >= (k + 1) / rate - SLACK_S - 0.001 for k, t in enumerate(times)), times
    paced = (len(times) - 10) / (times[-1] - times[9])
    assert 0.85 * rate <= paced <= 1.01 * rate, paced
    assert b.waited > 0.2


def test_bucket_given_back_lets_the_next_one_go_sooner() -> None:
    async def go(refund: bool) -> float:
        b = Bucket(per_minute=600 / HEADROOM)  # 10 units a second
        t0 = time.monotonic()
        await b.take(5)  # estimated at 0.5 s worth: goes at 0.45 s (0.05 s of slack)
        second = asyncio.ensure_future(b.take(5))  # due 0.5 s after the first
        await asyncio.sleep(0.05)
        if refund:
            b.give(4.9)  # the first answer cost 0.1 of its estimate: the waiting one goes sooner
        await second
        return time.monotonic() - t0

    assert asyncio.run(go(True)) < 0.7
    assert asyncio.run(go(False)) > 0.85


def test_aimd_cuts_once_per_round_grows_back_additively_never_above_the_ceiling() -> None:
    async def go() -> None:
        lim = Limits(concurrency=16)
        body: dict = {"messages": []}
        round1 = [await lim.enter(body) for _ in range(16)]
        assert lim.in_flight == 16
        lim.leave(round1[0], 429)
        assert lim.limit == 8 and lim.refused[429] == 1
        lim.leave(round1[1], 429)  # sent before the cut: the same round, no second cut
        assert lim.limit == 8 and lim.refused[429] == 2
        for t in round1[2:]:
            lim.leave(t, 200)
        # the limit grew by 1/limit per answer: 14 answers from 8 -> a bit over 9
        assert 9 <= lim.limit < 10
        t = await lim.enter(body)
        lim.leave(t, 503)  # sent after the cut: a new round, cut again
        assert int(lim.limit) == 4 and lim.lowest == 4 and lim.refused[503] == 1
        for _ in range(400):
            lim.leave(await lim.enter(body), 200)
        assert lim.limit == 16 and lim.in_flight == 0  # back to the ceiling, not above

    asyncio.run(go())


def test_concurrency_limit_holds_requests_and_retry_after_holds_new_ones() -> None:
    async def go() -> None:
        lim = Limits(concurrency=4)
        body: dict = {"messages": []}
        held = [await lim.enter(body) for _ in range(4)]
        lim.leave(held.pop(), 429, retry_after=0.3)  # limit 4 -> 2, and no new request for 0.3 s
        waiting = asyncio.ensure_future(lim.enter(body))
        await asyncio.sleep(0.05)
        assert not waiting.done() and lim.in_flight == 3  # 3 in flight, over the new limit of 2
        lim.leave(held.pop(), 200)
        lim.leave(held.pop(), 200)
        t0 = time.monotonic()
        ticket = await waiting  # a slot is free now; the Retry-After still holds it
        assert time.monotonic() - t0 > 0.15
        lim.leave(ticket, 200)
        assert int(lim.limit) == 3 and lim.in_flight == 1  # 2, then 1/limit more for each of 3 answers
        held += [await lim.enter(body), await lim.enter(body)]  # full again
        cancelled = [asyncio.ensure_future(lim.enter(body)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert not any(f.done() for f in cancelled)
        for f in cancelled:  # the run stops: waiting requests are cancelled, and hold no slot
            f.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)
        for t in held:
            lim.leave(t, 200)
        assert lim.in_flight == 0 and all(f.done() for f in lim._waiters)

    asyncio.run(go())


@pytest.mark.parametrize("status,used,left", [(200, 30, 70), (429, None, 100), (400, None, 100), (0, None, 0)])
def test_tokens_corrected_by_usage_and_refunded_when_refused(status: int, used: int | None, left: float) -> None:
    async def go() -> float:
        lim = Limits(concurrency=4, tpm=int(6000 / HEADROOM))  # 100 tokens a second
        body = {"messages": [], "max_tokens": 100}
        t = await lim.enter(body)
        assert t[1] == 100
        assert lim.tokens is not None
        before = lim.tokens.paid_at
        lim.leave(t, status, used)
        return (before - lim.tokens.paid_at) * lim.tokens.rate  # tokens given back

    assert asyncio.run(go()) == pytest.approx(left)
