"""Time limits on reading a request body, which uvicorn does not have.

Without them a client that sends its headers and part of a body, then stalls, holds its buffer
(up to ``max_body_bytes``) and its connection for as long as it likes: 40 such uploads once held
944 MB indefinitely. Each wait for the next chunk is bounded by ``body_idle_timeout_s`` and the
whole body by ``body_timeout_s`` from the request's start; past either, the read raises
:class:`~service.errors.RequestTimeout`, answered 408 with the JSON error body, and the connection
is closed.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import RequestTimeout


class BodyTimeoutMiddleware:
    """Bounds every ``receive()`` until the body is complete; later ones (waiting for the client
    to disconnect while a result is computed) are left alone."""

    def __init__(self, app: ASGIApp, idle_s: float, total_s: float) -> None:
        self.app = app
        self.idle_s = idle_s
        self.total_s = total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s
        body_done = False

        async def bounded_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            left = deadline - loop.time()
            try:
                async with asyncio.timeout(min(self.idle_s, left)):
                    message = await receive()
            except TimeoutError:
                if left <= self.idle_s:
                    raise RequestTimeout(f"the request body took longer than {self.total_s:g} s") from None
                raise RequestTimeout(f"no request body data for {self.idle_s:g} s") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, bounded_receive, send)
