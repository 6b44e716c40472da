"""An aiohttp server on its own event loop and thread, for test fixtures: 127.0.0.1 only, bounded.

A subclass adds its routes in ``routes(app)`` (and may open/close its own resources in
``opened``/``closing``); ``with Server(...) as s: ... s.base_url`` runs it, and it stops by itself
after ``max_seconds`` even if a test forgets to.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Self

from aiohttp import web


class ThreadedServer:
    name = "test-server"
    runner_options: dict[str, Any] = {}  # web.AppRunner's keyword arguments
    backlog = 128
    client_max_size = 1 << 20

    def __init__(self, max_seconds: float = 120.0) -> None:
        self.max_seconds = max_seconds
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True)
        self._runner: web.AppRunner | None = None
        self._timer: asyncio.TimerHandle | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def opened(self) -> None:
        """Runs on the server's loop before it listens."""

    async def closing(self) -> None:
        """Runs on the server's loop after it stopped listening."""

    async def _up(self, port: int) -> int:
        await self.opened()
        app = web.Application(client_max_size=self.client_max_size)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, **self.runner_options)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, backlog=self.backlog)
        await site.start()
        self._timer = self._loop.call_later(self.max_seconds, lambda: asyncio.ensure_future(self._down()))
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _down(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self.closing()

    def start(self, port: int = 0) -> Self:
        self._thread.start()
        real = asyncio.run_coroutine_threadsafe(self._up(port), self._loop).result(10)
        self.base_url = f"http://127.0.0.1:{real}/v1"
        return self

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._down(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RouteServer(ThreadedServer):
    """A ``ThreadedServer`` whose routes come from a function: ``RouteServer(add_routes).start()``."""

    def __init__(self, add_routes: Callable[[web.Application], None], max_seconds: float = 120.0,
                 **runner_options: Any) -> None:
        super().__init__(max_seconds)
        self._add_routes = add_routes
        self.runner_options = runner_options

    def routes(self, app: web.Application) -> None:
        self._add_routes(app)
