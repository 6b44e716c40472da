"""The one backend protocol: a batched call, messages in; texts, token counts, log-probs out.

A request whose last message has role ``assistant`` asks the model to *continue* that message
(no new turn is opened): this is how the judge puts "The answer is: (" in the model's mouth
and reads the next token's log-probabilities.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict, runtime_checkable

if TYPE_CHECKING:
    from typing import Self


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters, named as in vLLM and the OpenAI API."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = 0
    logprobs: int | None = None  # how many top log-probs to return per generated token
    stop: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None  # structured output: the answer is one of these
    # > 1 discourages tokens already in the prompt or the answer (vLLM's and HF's definition:
    # a seen token's logit is divided by it when positive, multiplied when negative).
    repetition_penalty: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["choices"] = list(self.choices) if self.choices is not None else None
        return key_fields(d)


# Fields added after cai first wrote cache keys and fingerprints; left out of both while at
# their default, so that adding one does not invalidate every cache and resumable output.
LATER_FIELDS = {"repetition_penalty": 1.0}


def key_fields(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (a Sampling's fields) without the later fields that are at their default."""
    if any(d.get(k, v) == v for k, v in LATER_FIELDS.items()):
        d = {k: v for k, v in d.items() if LATER_FIELDS.get(k, object()) != v}
    return d


@dataclass(frozen=True)
class Request:
    messages: tuple[Message, ...]
    sampling: Sampling = field(default_factory=Sampling)
    # Which row asked (its id): a backend over several servers sends a row's calls to one server,
    # whose prefix cache holds its earlier turns. Not part of what is asked: not in cache keys.
    affinity: str | None = field(default=None, compare=False)

    @property
    def continues(self) -> bool:
        """True when the model should continue the final assistant message."""
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"


@dataclass
class Completion:
    """One request's answer. ``error`` is set (and ``texts`` empty) when the call failed."""

    texts: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Top log-probs of each generated token of the first choice: one {token: logprob} per token.
    logprobs: list[dict[str, float]] | None = None
    finish_reasons: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Backend(Protocol):
    """Anything with a model id, a batched ``complete`` and a one-request ``acomplete``.

    ``complete``: order of results = order of requests. ``acomplete``: one request, awaited;
    the runner feeds every ready request through it, so the engine always has work.
    ``submit``: one request from any thread; the future's callbacks run where the answer
    arrives (the call cache commits there, before anything else happens).
    A backend never raises for one bad request: it returns a ``Completion`` with ``error`` set.
    It raises ``BackendError`` only when it cannot work at all (unreachable, misconfigured).

    Declared capabilities: ``concurrent`` (``complete`` may be called from several threads at
    once: a server client); ``max_batch`` (for one that is not: requests it computes at once);
    ``loop`` (the event loop ``acomplete`` must be awaited in, for a
    backend that runs its own, or None: any loop).
    """

    model_id: str
    concurrent: bool
    max_batch: int
    loop: asyncio.AbstractEventLoop | None

    def complete(self, requests: Sequence[Request]) -> list[Completion]: ...

    async def acomplete(self, request: Request) -> Completion: ...

    def submit(self, request: Request) -> Future[Completion]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class BackendBase:
    """What every backend shares: declared capabilities, one-request ``acomplete`` on top of a
    batched ``complete``, and use as a context manager (``with build_backend(...) as be:``
    closes it however the block ends).

    The default ``acomplete`` hands requests to one worker thread that calls ``complete`` on
    whatever requests are ready (up to ``max_batch``): micro-batches of ready requests, for the
    backends that compute in this process (embedded, fake, and vLLM's synchronous engine).
    """

    concurrent: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    max_batch: int = 64
    _batcher: _Batcher | None = None

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        raise NotImplementedError

    def submit(self, request: Request) -> Future[Completion]:
        if self._batcher is None:
            self._batcher = _Batcher(self.complete, self.max_batch)
        return self._batcher.submit(request)

    async def acomplete(self, request: Request) -> Completion:
        return await asyncio.wrap_future(self.submit(request))

    def close(self) -> None:
        """Stop the worker thread; subclasses free what they hold and call this too."""
        if self._batcher is not None:
            self._batcher.stop()
            self._batcher = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Batcher:
    """One daemon thread: take every queued request (at most ``max_batch``), answer them with
    one ``complete`` call, repeat. A failing ``complete`` fails its batch's futures, not the thread."""

    def __init__(self, complete: Callable[[Sequence[Request]], list[Completion]], max_batch: int) -> None:
        self._complete, self._max = complete, max(1, max_batch)
        self._queue: queue.SimpleQueue[tuple[Request, Future[Completion]] | None] = queue.SimpleQueue()
        threading.Thread(target=self._work, name="cai-batcher", daemon=True).start()

    def submit(self, request: Request) -> Future[Completion]:
        fut: Future[Completion] = Future()
        self._queue.put((request, fut))
        return fut

    def stop(self) -> None:
        self._queue.put(None)

    def _work(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while len(batch) < self._max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                done = self._complete([r for r, _ in batch])
                for (_, fut), c in zip(batch, done, strict=True):
                    fut.set_result(c)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting rows
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
