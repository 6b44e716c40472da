"""Backends by name, and the one place that builds them. No plugin system: a dict of factories.

- ``embedded``: transformers on the CPU, SmolLM2-135M-Instruct prepared by `cai prepare-model`.
- ``openai``: any OpenAI-compatible server (``vllm serve``, ...), many requests in flight.
- ``vllm``: in-process ``vllm.LLM``.
- ``fake``: scripted, for tests and dry runs.

Each backend declares what it can do (``concurrent``) and is a context manager.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import BackendError
from .base import Backend, BackendBase, Completion, Message, Request, Sampling

DEFAULT_BASE_URL = "http://localhost:8000/v1"
DEFAULT_CONCURRENCY = 256


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


def build_backend(name: str, model: str | None = None, *, base_url: str = DEFAULT_BASE_URL,
                  api_key: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                  **options: Any) -> Backend:
    """The backend the commands and the pipeline use: the server settings go to the ``openai``
    backend only; ``options`` (engine settings, say) go to the backend as they are."""
    if name == "openai":
        options.update(base_url=base_url, api_key=api_key, concurrency=concurrency)
    return make_backend(name, model=model, **options)


__all__ = ["BACKENDS", "DEFAULT_BASE_URL", "Backend", "BackendBase", "Completion", "Message", "Request",
           "Sampling", "build_backend", "make_backend"]
