"""Connections that cannot hold the service hostage: a header timeout, idle connections evicted
to make room, and a bound on requests in progress that health probes are exempt from.

uvicorn alone has no header timeout, and its ``limit_concurrency`` counts *open connections*,
idle ones included, and answers a plain-text 503 beyond it: 63 sockets that never sent a byte
locked every client out, ``/healthz`` and ``/readyz`` included, for as long as they stayed open.
Here:

- :func:`http_protocol` — uvicorn's HTTP protocol plus two rules. A connection that has not sent
  a request's headers within ``header_timeout_s`` of connecting (or of its previous answer) is
  closed. Beyond ``max_connections`` open connections, a new one makes room by closing the
  connection idle the longest (no request in progress: header-less or keep-alive), so idle
  sockets never starve a client that has something to ask.
- :class:`RequestLimitMiddleware` — at most ``max_connections`` requests in progress (the body
  buffers they hold are what the limit bounds); beyond it a request gets the JSON 503 ``busy``
  with ``Retry-After``. Probes and metrics (:data:`EXEMPT_PATHS`) are never refused, so an
  orchestrator never restarts a pod because clients are busy.
"""

from __future__ import annotations

import asyncio
import time
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .errors import error_response

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
BUSY_RETRY_AFTER_S = 1


def http_protocol(header_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools, else h11) with the header timeout and eviction of
    idle connections; give it to ``uvicorn.Config(http=...)``."""

    class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        idle_since: float
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._idle()
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and c.is_idle()]
                if idle:
                    min(idle, key=lambda c: c.idle_since).transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def is_idle(self) -> bool:
            """No request in progress: no headers yet, or the last answer sent (keep-alive)."""
            return self.cycle is None or self.cycle.response_complete

        def _idle(self) -> None:
            """From now on the client has ``header_timeout_s`` to send a request's headers."""
            self.idle_since = time.monotonic()
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            if self.is_idle():  # a request that came and went since re-armed the timer
                self.transport.close()

    return GuardedHTTPProtocol


class RequestLimitMiddleware:
    """At most ``limit`` HTTP requests in progress, probes and metrics not counted nor refused."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            response = error_response(
                503, "busy", f"the server has {self.limit} requests in progress, its limit; retry shortly",
                {"Retry-After": str(BUSY_RETRY_AFTER_S), "Connection": "close"},
            )
            await response(scope, receive, send)
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1

