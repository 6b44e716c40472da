"""The one backend protocol: a batched call, messages in; texts, token counts, log-probs out.

A request whose last message has role ``assistant`` asks the model to *continue* that message
(no new turn is opened): this is how the judge puts "The answer is: (" in the model's mouth
and reads the next token's log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Anything with a model id and a batched ``complete``. Order of results = order of requests.

    A backend never raises for one bad request: it returns a ``Completion`` with ``error`` set.
    It raises ``BackendError`` only when it cannot work at all (unreachable, misconfigured).
    ``concurrent`` declares that ``complete`` may be called from several threads at once (a
    server client); the runner keeps several chunks in flight only then.
    """

    model_id: str
    concurrent: bool

    def complete(self, requests: Sequence[Request]) -> list[Completion]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class BackendBase:
    """What every backend shares: declared capabilities, and use as a context manager
    (``with build_backend(...) as be:`` closes it however the block ends)."""

    concurrent: bool = False

    def close(self) -> None:
        """Free what the backend holds (connections, the model); the default holds nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
