"""``Call.many``: what ``asyncio.gather`` of the calls gave (it runs the first call in the caller's
task): answers in order, requests entering the backend in order, all in flight at once, a
failure raised, and the other calls cancelled with the caller."""

from __future__ import annotations

import asyncio

import pytest

from cai import runtime
from cai.errors import BackendError
from cai.stages.runner import Call, Pool
from cai.types import BackendBase, Completion, Request


def req(text: str) -> Request:
    return Request(({"role": "user", "content": text},))


class Recording(BackendBase):
    """Answers each request with its text once every request of the batch has arrived."""

    model_id = "rec"

    def __init__(self, together: int, fail: str | None = None) -> None:
        self.seen: list[str] = []
        self.together, self.fail = together, fail
        self.cancelled: list[str] = []

    async def generate(self, request: Request) -> Completion:
        text = request.messages[0]["content"]
        self.seen.append(text)
        try:
            while len(self.seen) < self.together:  # all in flight at once, or this never returns
                await asyncio.sleep(0)
            if text == self.fail:
                return Completion.failed("unreachable", "gone")
            await asyncio.sleep(0.01 if text == "slow" else 0)
        except asyncio.CancelledError:
            self.cancelled.append(text)
            raise
        return Completion([text.upper()], finish_reasons=["stop"])


def _many(be: Recording, texts: list[str]) -> list[Completion]:
    async def go() -> list[Completion]:
        return await Call(Pool(be, 8)).many(req(t) for t in texts)

    return runtime.run(go())


def test_answers_in_order_and_requests_in_flight_together_in_order():
    be = Recording(3)
    assert [c.text for c in _many(be, ["a", "b", "c"])] == ["A", "B", "C"]
    assert be.seen == ["a", "b", "c"]
    assert _many(Recording(0), []) == []


def test_a_failure_is_raised_and_a_cancelled_caller_cancels_the_others():
    be = Recording(2, fail="a")
    with pytest.raises(BackendError, match="gone"):
        _many(be, ["a", "b"])

    be = Recording(2)

    async def cancelled() -> None:
        task = asyncio.ensure_future(Call(Pool(be, 8)).many([req("x"), req("slow")]))
        while len(be.seen) < 2:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)

    runtime.run(cancelled())
    assert "slow" in be.cancelled
