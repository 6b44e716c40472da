"""The one event loop of a run: the runner, the call cache and every backend share it.

``run(coro)`` runs a coroutine on the process's loop and returns its result. Called from the
main thread with no loop running (the CLI, a script), the loop is the caller's own: one
``asyncio.Runner`` kept for the process, so a backend built by one call (its HTTP session, its
engine) serves the next. Called from another thread or from inside a running loop (a notebook,
a Ray actor's thread), the loop is one background thread's, started once.

Cancellation unwinds in order: Ctrl-C (or SIGTERM, during a run on the main thread) cancels the
run's task, whose rows cancel their requests; only once it has unwound is ``KeyboardInterrupt``
raised (for SIGTERM: the handler that was installed before, else ``SystemExit(143)``). Nothing
is left pending, so nothing prints "Task was destroyed but it is pending".
"""

from __future__ import annotations

import asyncio
import atexit
import signal
import threading
from collections.abc import Coroutine, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .backends.base import Backend
    from .types import Completion, Request

T = TypeVar("T")
EXIT_TERMINATED = 143
_runner: asyncio.Runner | None = None
_background: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on the process's run loop (see the module's docstring)."""
    try:
        asyncio.get_running_loop()
        nested = True
    except RuntimeError:
        nested = False
    if not nested and threading.current_thread() is threading.main_thread():
        return _run_here(coro)
    return _run_background(coro)


def _run_here(coro: Coroutine[Any, Any, T]) -> T:
    global _runner
    if _runner is None:
        _runner = asyncio.Runner()
    task: asyncio.Task[Any] | None = None
    termed: list[int] = []

    async def main() -> T:
        nonlocal task
        task = asyncio.current_task()
        return await coro

    def on_term(signum: int, frame: Any) -> None:
        termed.append(signum)
        if task is not None:
            here.call_soon_threadsafe(task.cancel)

    here = _runner.get_loop()
    previous = signal.getsignal(signal.SIGTERM)
    ours = previous in (signal.SIG_DFL, None) or callable(previous)
    if ours:
        signal.signal(signal.SIGTERM, on_term)
    try:
        return _runner.run(main())
    except asyncio.CancelledError:
        if not termed:
            raise
    finally:
        if ours:
            signal.signal(signal.SIGTERM, previous)
    if callable(previous):  # the handler the caller installed, now that the run has unwound
        previous(signal.SIGTERM, None)
    raise SystemExit(EXIT_TERMINATED)


def _run_background(coro: Coroutine[Any, Any, T]) -> T:
    global _background
    with _lock:
        if _background is None or _background.is_closed():
            _background = asyncio.new_event_loop()
            threading.Thread(target=_background.run_forever, name="cai-runtime", daemon=True).start()
    loop, ended = _background, threading.Event()

    async def main() -> T:
        try:
            return await coro
        finally:
            ended.set()

    fut = asyncio.run_coroutine_threadsafe(main(), loop)
    try:
        return fut.result()
    except BaseException:  # Ctrl-C in the waiting thread: cancel the run, let it unwind, then go on
        fut.cancel()
        ended.wait(60)
        raise


def generate_all(backend: Backend, requests: Iterable[Request]) -> list[Completion]:
    """Every request's completion, in order, all in flight at once (tests, small scripts)."""
    async def go() -> list[Completion]:
        return list(await asyncio.gather(*(backend.generate(r) for r in requests)))

    return run(go())


def close(backend: Backend) -> None:
    """Close ``backend`` on the loop it was used on."""
    run(backend.aclose())


B = TypeVar("B", bound="Backend | None")


@contextmanager
def closing(backend: B) -> Iterator[B]:
    """``with closing(build_backend(...)) as be:``: closed however the block ends (None: nothing)."""
    try:
        yield backend
    finally:
        if backend is not None:
            close(backend)


@atexit.register
def shutdown() -> None:
    """Close the run loops (what is still pending is cancelled and awaited first)."""
    global _runner, _background
    if _runner is not None:
        runner, _runner = _runner, None
        runner.close()
    if _background is not None and not _background.is_closed():
        bg, _background = _background, None

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await bg.shutdown_asyncgens()

        asyncio.run_coroutine_threadsafe(drain(), bg).result(30)
        bg.call_soon_threadsafe(bg.stop)
