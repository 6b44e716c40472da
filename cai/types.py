"""The values every layer passes (messages in, sampling, a request, its completion or failure)
and the backend contract that passes them (``Backend``: see ``cai.backends.base``).

A request whose last message has role ``assistant`` asks the model to *continue* that message
(no new turn is opened): this is how the judge puts "The answer is: (" in the model's mouth
and reads the next token's log-probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, TypedDict, runtime_checkable


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
    # What the call is for (``answer``, ``critique``, ``revision``, ``judge``, ``sample``...) and
    # the stage that asked (``revise``, ``label``...): run.json's usage is summed by them. Not
    # part of what is asked either: not in cache keys.
    step: str | None = field(default=None, compare=False)
    stage: str | None = field(default=None, compare=False)

    @property
    def continues(self) -> bool:
        """True when the model should continue the final assistant message."""
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"


FailureKind = Literal["request", "server", "unreachable"]


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a call failed, decided where it failed: ``request`` (this request's own fault: a 4xx,
    a prompt too long), ``server`` (the server's: 5xx or timeouts until the retries ran out),
    ``unreachable`` (nothing answers at all: the run cannot go on with that server)."""

    kind: FailureKind
    message: str


@dataclass(init=False, slots=True)
class Completion:
    """One request's answer; ``failure`` is set (and ``texts`` empty) when the call failed.
    ``error=`` in the constructor is a request failure with that message."""

    texts: list[str]
    prompt_tokens: int
    completion_tokens: int
    # Of the prompt tokens, those the server took from its prefix cache (as it reports them:
    # OpenAI's and vLLM's ``usage.prompt_tokens_details.cached_tokens``; 0 when it does not say).
    cached_prompt_tokens: int
    # Top log-probs of each generated token of the first choice: one {token: logprob} per token.
    logprobs: list[dict[str, float]] | None
    finish_reasons: list[str]
    failure: Failure | None

    def __init__(self, texts: list[str], prompt_tokens: int = 0, completion_tokens: int = 0,
                 logprobs: list[dict[str, float]] | None = None, finish_reasons: list[str] | None = None,
                 failure: Failure | None = None, error: str | None = None, cached_prompt_tokens: int = 0) -> None:
        self.texts, self.prompt_tokens, self.completion_tokens = texts, prompt_tokens, completion_tokens
        self.cached_prompt_tokens = cached_prompt_tokens
        self.logprobs = logprobs
        self.finish_reasons = finish_reasons if finish_reasons is not None else []
        self.failure = failure if error is None else Failure("request", error)

    @classmethod
    def failed(cls, kind: FailureKind, message: str) -> Completion:
        return cls([], failure=Failure(kind, message))

    @property
    def error(self) -> str | None:
        """The failure's message, or None (what the stages read)."""
        return self.failure.message if self.failure is not None else None

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape the call cache stores (unchanged since the first cache: ``error`` last;
        ``cached_prompt_tokens`` after it, only when the server reported some)."""
        d = {"texts": self.texts, "prompt_tokens": self.prompt_tokens,
             "completion_tokens": self.completion_tokens, "logprobs": self.logprobs,
             "finish_reasons": self.finish_reasons, "error": self.error}
        if self.cached_prompt_tokens:
            d["cached_prompt_tokens"] = self.cached_prompt_tokens
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Completion:
        return cls(d["texts"], d.get("prompt_tokens", 0), d.get("completion_tokens", 0), d.get("logprobs"),
                   d.get("finish_reasons"), error=d.get("error"), cached_prompt_tokens=d.get("cached_prompt_tokens", 0))


@runtime_checkable
class Backend(Protocol):
    model_id: str

    async def generate(self, request: Request) -> Completion: ...

    async def aclose(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class BackendBase:
    """Defaults for a small backend (tests, wrappers): nothing to close, nothing to describe."""

    model_id: str

    async def generate(self, request: Request) -> Completion:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {}
