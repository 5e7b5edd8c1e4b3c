"""``vpdsr serve``: run the HTTP service (registered through the ``vpdsr.commands`` entry points)."""

from __future__ import annotations

import argparse
import logging

from pydantic import ValidationError

from model import Registry
from model.cli import common_options
from model.errors import VPDSRError

from .settings import Settings

_UVICORN_TO_LOGGING = {"trace": "DEBUG"}


def serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .server import Server

    overrides = {name: getattr(args, name) for name in ("host", "port", "model", "registry")}
    try:
        settings = Settings(**{name: value for name, value in overrides.items() if value is not None})
    except ValidationError as exc:
        raise VPDSRError(f"invalid settings:\n{exc}") from None
    # Fail fast with a one-line message on a reference that names nothing, before binding a port.
    Registry(settings.registry).resolve(settings.model)
    logging.basicConfig(
        level=_UVICORN_TO_LOGGING.get(settings.log_level, settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One process per GPU: the engine owns the device and batches across all requests of it.
    server = Server(create_app(settings), settings)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down
        pass
    return 0 if server.started else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common_options()],
        help="run the HTTP service (settings: VPDSR_* environment variables, see docs/service.md)",
    )
    p.add_argument("--host", default=None, help="bind address (default: $VPDSR_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: $VPDSR_PORT or 8000)")
    p.add_argument("--model", default=None, help="registry reference (default: $VPDSR_MODEL or vpdsr-small@production)")
    p.set_defaults(handler=serve)
