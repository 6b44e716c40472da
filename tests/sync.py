"""Backends driven from synchronous test code, on the run's loop (``cai.runtime``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cai import runtime
from cai.backends.base import Backend, Completion, Request


class Sync:
    """``complete(requests)``: every request's ``generate`` in flight at once, answers in order;
    ``close()`` is ``aclose`` on the loop; a context manager. Other attributes are the backend's."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def complete(self, requests: Iterable[Request]) -> list[Completion]:
        return runtime.generate_all(self.backend, requests)

    def close(self) -> None:
        runtime.close(self.backend)

    def __enter__(self) -> Sync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
