"""Backends by name. No plugin system: a dict of factories is enough.

- ``embedded``: transformers on the CPU, SmolLM2-135M-Instruct prepared by `cai prepare-model`.
- ``openai``: any OpenAI-compatible server (``vllm serve``, ...), many requests in flight.
- ``vllm``: in-process ``vllm.LLM``.
- ``fake``: scripted, for tests and dry runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import BackendError
from .base import Backend, Completion, Message, Request, Sampling


def _embedded(**kw: Any) -> Backend:
    from .embedded import EmbeddedBackend

    return EmbeddedBackend(**kw)


def _openai(**kw: Any) -> Backend:
    from .openai_server import OpenAIServerBackend

    return OpenAIServerBackend(**kw)


def _vllm(**kw: Any) -> Backend:
    from .vllm_local import VLLMBackend

    return VLLMBackend(**kw)


def _fake(**kw: Any) -> Backend:
    from .fake import FakeBackend

    kw.pop("model", None)
    return FakeBackend(**kw)


BACKENDS: dict[str, Callable[..., Backend]] = {
    "embedded": _embedded,
    "openai": _openai,
    "vllm": _vllm,
    "fake": _fake,
}


def make_backend(name: str, **options: Any) -> Backend:
    """Build a backend by name; ``options`` with value ``None`` are left to the backend's default."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    return BACKENDS[name](**{k: v for k, v in options.items() if v is not None})


__all__ = ["BACKENDS", "Backend", "Completion", "Message", "Request", "Sampling", "make_backend"]
