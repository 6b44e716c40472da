"""The one event loop of a run: the runner, the call cache and every backend share it.

``run(coro)`` runs a coroutine on the process's run loop and returns its result. There is one
such loop per process (an ``asyncio.Runner`` kept for the process), so a backend built by one
call (its HTTP session, its engine, its health monitor) serves the next, whichever thread makes
it: the CLI's main thread drives the loop itself; a Ray actor's or a worker's thread drives it
the same way (one thread at a time); a caller that runs a loop of its own (a notebook) has it
driven by a helper thread while it waits.

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
    from .types import Backend, Completion, Request

T = TypeVar("T")
EXIT_TERMINATED = 143
_runner: asyncio.Runner | None = None
_lock = threading.Lock()  # one thread drives the loop at a time
_task: asyncio.Task[Any] | None = None  # the run in progress


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on the process's run loop (see the module's docstring)."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is None:
        return _drive(coro)
    if _runner is not None and running is _runner.get_loop():
        coro.close()
        raise RuntimeError("cai.runtime.run() called on the run's own loop: await the coroutine instead")
    done: list[Any] = []  # a loop of the caller's own: a helper thread drives ours meanwhile

    def drive() -> None:
        try:
            done.append((True, _drive(coro)))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            done.append((False, e))

    helper = threading.Thread(target=drive, name="cai-runtime")
    helper.start()
    try:
        helper.join()
    except BaseException:  # Ctrl-C while waiting: cancel the run, let it unwind
        if _task is not None and _runner is not None:
            _runner.get_loop().call_soon_threadsafe(_task.cancel)
        helper.join(60)
        raise
    ok, value = done[0]
    if not ok:
        raise value
    return value


def _drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the run loop from this thread (the loop waits for no other thread)."""
    global _runner
    with _lock:
        if _runner is None:
            _runner = asyncio.Runner()
        main_thread = threading.current_thread() is threading.main_thread()
        termed: list[int] = []

        async def main() -> T:
            global _task
            _task = asyncio.current_task()
            try:
                return await coro
            finally:
                _task = None

        def on_term(signum: int, frame: Any) -> None:
            termed.append(signum)
            if _task is not None:
                here.call_soon_threadsafe(_task.cancel)

        here = _runner.get_loop()
        previous = signal.getsignal(signal.SIGTERM) if main_thread else signal.SIG_IGN
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
    """Close the run loop (what is still pending is cancelled and awaited first)."""
    global _runner
    if _runner is not None:
        runner, _runner = _runner, None
        runner.close()
