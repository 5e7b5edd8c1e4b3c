"""uvicorn as the service runs it: connection limits, timeouts and a shutdown that stops at once.

``vpdsr serve`` and the tests' live server (:func:`tests.live.live_server`) both go through
:class:`Server`, so tests exercise the limits and the shutdown that production has.
"""

from __future__ import annotations

import socket
from typing import Any

import uvicorn
from starlette.applications import Starlette

from .app import BackgroundWork
from .connections import http_protocol
from .settings import Settings


def uvicorn_config(app: Starlette, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The header timeout and ``max_connections`` (:mod:`service.connections`) and the body
    timeouts (:mod:`service.body_timeout`) bound what idle or stalled clients can hold;
    ``shutdown_timeout_s`` bounds how long they can delay an exit."""
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        http=http_protocol(settings.header_timeout_s, settings.max_connections),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    return uvicorn.Config(app, **(options | overrides))


class Server(uvicorn.Server):
    """uvicorn's server, plus: as soon as exit is requested (SIGTERM, SIGINT, ``should_exit``), the
    app stops taking background work, before uvicorn waits up to ``shutdown_timeout_s`` for open
    connections. uvicorn's own order (drain, then the lifespan's shutdown) left the job consumer
    taking new jobs for as long as a stalled upload kept its connection open. ``app`` is what
    :func:`service.app.create_app` made (its state holds the :class:`BackgroundWork`); typed as the
    ASGI framework's base class, since nothing here needs FastAPI's own."""

    def __init__(self, app: Starlette, settings: Settings, **overrides: Any) -> None:
        super().__init__(uvicorn_config(app, settings, **overrides))
        self.background: BackgroundWork = app.state.background

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.background.stop_taking_work()
        await super().shutdown(sockets)
