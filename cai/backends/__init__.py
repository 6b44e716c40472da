"""Backends by name, and the one place that builds them. No plugin system: a dict of factories.

- ``embedded``: transformers on the CPU, SmolLM2-135M-Instruct prepared by `cai prepare-model`.
- ``openai``: any OpenAI-compatible server (``vllm serve``, ...), many requests in flight; given
  several server URLs, a ``MultiServerBackend`` spreads the calls over them (``multi.py``).
- ``vllm``: in-process ``AsyncLLM``, driven from the run's loop.
- ``fake``: scripted, for tests and dry runs.

Every backend has the contract of ``base.Backend``: ``model_id``, ``async generate(request)``,
``async aclose()``, ``describe()``. Adding one is a module and a line in ``BACKENDS``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import BackendError
from .base import Backend, BackendBase, Completion, Failure, Message, Request, Sampling
from .urls import split_urls

DEFAULT_BASE_URL = "http://localhost:8000/v1"
DEFAULT_CONCURRENCY = 256


def base_url_value(value: str | Iterable[str] | None) -> str | list[str]:
    """``base_url`` as the config and the CLI keep it: one URL as a string (as it always was),
    several as a list. ``ValueError`` when there is none."""
    if isinstance(value, str) and "," not in value and value.strip():
        return value  # kept as written
    urls = split_urls(value)
    if not urls:
        raise ValueError("no server URL given")
    return urls[0] if len(urls) == 1 else urls


def _openai(**kw: Any) -> Backend:
    urls = split_urls(kw.get("base_url"))
    if len(urls) > 1:  # several servers: one client each, calls spread over them
        from .multi import MultiServerBackend

        return MultiServerBackend(**{**kw, "base_url": urls})
    from .openai_server import OpenAIServerBackend

    if urls:
        kw["base_url"] = urls[0]
    return OpenAIServerBackend(**kw)


def _fake(**kw: Any) -> Backend:
    from .fake import FakeBackend

    return FakeBackend(model_id=kw.pop("model", None) or "fake", **kw)  # a model named is its id (policy_model)


def _lazy(module: str, name: str) -> Callable[..., Backend]:
    """The backend class ``name`` of ``module``, imported when first built (torch, vllm: seconds)."""
    return lambda **kw: getattr(importlib.import_module(module, __name__), name)(**kw)


BACKENDS: dict[str, Callable[..., Backend]] = {
    "embedded": _lazy(".embedded", "EmbeddedBackend"),
    "openai": _openai,
    "vllm": _lazy(".vllm_local", "VLLMBackend"),
    "fake": _fake,
}


def make_backend(name: str, **options: Any) -> Backend:
    """Build a backend by name; ``options`` with value ``None`` are left to the backend's default."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    return BACKENDS[name](**{k: v for k, v in options.items() if v is not None})


def build_backend(name: str, model: str | None = None, *, base_url: str | Iterable[str] = DEFAULT_BASE_URL,
                  api_key: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                  **options: Any) -> Backend:
    """The backend the commands and the pipeline use: the server settings go to the ``openai``
    backend only; ``options`` (engine settings, say) go to the backend as they are. ``base_url``
    may name several servers (a list, or a comma-separated string): the ``openai`` backend is then
    a ``MultiServerBackend`` over them."""
    if name == "openai":
        options.update(base_url=base_url, api_key=api_key, concurrency=concurrency)
    _say_loading(name, model)
    return make_backend(name, model=model, **options)


def build_batch_backend(model: str | None, key: Callable[[str, Request], str], *, files: str | Path | None = None,
                        folder: Path | None = None, base_url: str | Iterable[str] = DEFAULT_BASE_URL,
                        api_key: str | None = None, server: str = "auto", extra_body: dict[str, Any] | None = None,
                        max_requests: int = 50_000, poll: float = 30.0, timeout: float = 120.0) -> Backend:
    """Batch mode's backend (``key``: the call cache's ``request_key``, each request's custom_id):
    ``files`` a folder of offline wave files (``batch_files.py``), else the Batch API of the first
    server of ``base_url``, its state in ``folder/batches.sqlite`` (``batch_api.py``)."""
    if files is not None:
        from .batch_files import BatchFilesBackend

        if not model:
            raise BackendError("--batch-files needs --model (the model the requests name)")
        return BatchFilesBackend(model, key, folder=files, server=server, extra_body=extra_body,
                                 max_requests=max_requests)
    from .batch_api import BatchApiBackend

    return BatchApiBackend(model, key, base_url=split_urls(base_url)[0], api_key=api_key, folder=folder,
                           server=server, extra_body=extra_body, max_requests=max_requests, poll=poll,
                           timeout=timeout)


def _say_loading(name: str, model: str | None) -> None:
    """``loading model X`` on stderr before a model loads in this process (seconds, even minutes,
    with no other sign of life); nothing where loading would fail at once (the backend's error says why)."""
    engine = {"embedded": "transformers", "vllm": "vllm"}.get(name)
    if engine is None or importlib.util.find_spec(engine) is None:
        return
    from ..model import default_model_dir, is_prepared

    where = Path(model) if model else default_model_dir()
    if not is_prepared(where) if model is None else name == "embedded" and not where.exists():
        return
    print(f"loading model {model or where} ({name} backend) ...", file=sys.stderr, flush=True)


__all__ = ["BACKENDS", "DEFAULT_BASE_URL", "Backend", "BackendBase", "Completion", "Failure", "Message", "Request",
           "Sampling", "base_url_value", "build_backend", "build_batch_backend", "make_backend", "split_urls"]
