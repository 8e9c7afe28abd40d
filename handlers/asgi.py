"""The HTTP API's ASGI app, built on its first request.

Every Functions worker imports function_app.py on its cold start, whichever trigger woke
it: a timer, a queue message or an event. Building the FastAPI app there would make each
of them pay for FastAPI and pydantic (a fifth of the cold start, measured by bench
cold_start) although only the HTTP API uses them. So the app hands the host a small ASGI
callable that builds the real one when the first HTTP request (or lifespan event) arrives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class LazyAsgiApp:
    def __init__(self, build: Callable[[], AsgiApp]) -> None:
        self._build = build
        self._app: AsgiApp | None = None

    @property
    def app(self) -> AsgiApp:
        """The real app, built now if no request has built it yet."""
        if self._app is None:
            self._app = self._build()
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
