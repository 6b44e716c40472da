"""A scripted fake backend for tests and dry runs: no model, deterministic, records every call.

``FakeBackend()`` answers every request with a short text derived from its messages, and when
log-probs are asked for, returns a top list over "A"/"B" whose split depends on the request.
Pass ``respond`` (a function of the request) to script exact answers, and ``fail`` (a
predicate) to make chosen requests fail, as a flaky server would.

For crash tests run as a subprocess, two environment variables (or the ``delay``/``log``
arguments) slow it down and record what it answered: ``CAI_FAKE_DELAY`` sleeps that many
seconds per batch, as a server would take; ``CAI_FAKE_LOG`` appends, once a batch is answered,
one line ``PID BATCH DIGEST`` per request to that file.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
from collections.abc import Callable, Sequence

from ..types import BackendBase, Completion, Request
from .batching import MicroBatcher

Responder = Callable[[Request], "Completion | str"]


def _digest(req: Request) -> int:
    blob = repr((req.messages, req.sampling)).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big")


def default_respond(req: Request) -> Completion:
    last = req.messages[-1]["content"] if req.messages else ""
    h = _digest(req)
    if req.sampling.choices:
        text = req.sampling.choices[h % len(req.sampling.choices)]
        return Completion(texts=[text], prompt_tokens=len(last.split()), completion_tokens=1)
    if req.sampling.logprobs:
        p = 0.05 + 0.9 * ((h % 1000) / 999)
        lp = {"A": math.log(p), "B": math.log(1 - p)}
        top = max(lp, key=lambda k: lp[k])
        return Completion(
            texts=[top], prompt_tokens=len(last.split()), completion_tokens=1, logprobs=[lp],
            finish_reasons=["length"],
        )
    words = " ".join(last.split()[:8])
    texts = [f"fake reply {h % 10_000 + i} to: {words}" for i in range(req.sampling.n)]
    return Completion(
        texts=texts, prompt_tokens=len(last.split()),
        completion_tokens=sum(len(t.split()) for t in texts), finish_reasons=["stop"] * len(texts),
    )


class FakeBackend(MicroBatcher, BackendBase):
    """Scripted stand-in for a model. ``calls`` keeps every request, ``batches`` each batch size;
    requests are answered in micro-batches of ready ones (at most ``max_batch``): ``generate`` and
    ``aclose`` are the ``MicroBatcher``'s."""

    def __init__(
        self,
        respond: Responder | None = None,
        *,
        model_id: str = "fake",
        fail: Callable[[Request], bool] | None = None,
        delay: float | None = None,
        log: str | None = None,
        max_batch: int = 64,
    ) -> None:
        self.model_id = model_id
        self.respond = respond or default_respond
        self.fail = fail
        self.calls: list[Request] = []
        self.batches: list[int] = []
        self.delay = float(os.environ.get("CAI_FAKE_DELAY") or 0) if delay is None else delay
        self.log = log or os.environ.get("CAI_FAKE_LOG") or None
        self._batch_no = itertools.count(1)
        super().__init__(self.compute, max_batch)

    def compute(self, requests: Sequence[Request]) -> list[Completion]:
        self.batches.append(len(requests))
        n = next(self._batch_no)
        out: list[Completion] = []
        for req in requests:
            self.calls.append(req)
            if self.fail is not None and self.fail(req):
                out.append(Completion.failed("request", "scripted failure"))
                continue
            res = self.respond(req)
            out.append(res if isinstance(res, Completion) else Completion(texts=[res]))
        if self.delay:
            time.sleep(self.delay)
        if self.log:
            lines = "".join(f"{os.getpid()} {n} {_digest(r):016x}\n" for r in requests)
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(lines)
        return out
