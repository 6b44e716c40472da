"""The backend contract, whole: a model id, one request in and its completion out, a close, and
what the backend says of itself for run.json. The values it passes live in ``cai.types``.

``generate`` never raises for one request: a failed call is a ``Completion`` whose ``failure``
says whose fault it was (``request``, ``server``, ``unreachable``), decided where it failed.
Every backend runs on the run's event loop (``cai.runtime``): none owns a thread or a loop.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ..types import LATER_FIELDS, Completion, Failure, Message, Request, Sampling, key_fields


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


__all__ = ["LATER_FIELDS", "Backend", "BackendBase", "Completion", "Failure", "Message", "Request", "Sampling",
           "key_fields"]
