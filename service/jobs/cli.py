"""``vpdsr worker`` (registered through the ``vpdsr.commands`` entry points as ``jobs``)."""

from __future__ import annotations

import argparse
import logging

from pydantic import ValidationError

from model import Registry
from model.cli import common_options
from model.errors import VPDSRError

_UVICORN_TO_LOGGING = {"trace": "DEBUG"}


def worker(args: argparse.Namespace) -> int:
    from ..settings import Settings
    from .worker import check_worker_settings, main

    overrides = {"model": args.model, "registry": args.registry, "metrics_port": args.metrics_port}
    try:
        settings = Settings(**{name: value for name, value in overrides.items() if value is not None})
    except ValidationError as exc:
        raise VPDSRError(f"invalid settings:\n{exc}") from None
    check_worker_settings(settings)  # configuration mistakes: one line, before loading anything
    Registry(settings.registry).resolve(settings.model)
    logging.basicConfig(
        level=_UVICORN_TO_LOGGING.get(settings.log_level, settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return main(settings, metrics_addr=args.metrics_addr)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        parents=[common_options()],
        help="consume the Redis job queue (POST /v1/jobs) with the model; no HTTP but Prometheus metrics",
        description="Runs jobs from the Redis stream vpdsr:jobs (consumer group vpdsr-workers) through the "
        "same engine and batcher as `vpdsr serve`. Settings: VPDSR_* environment variables "
        "(VPDSR_REDIS_URL is required); see docs/jobs.md. SIGTERM stops it gracefully.",
    )
    p.add_argument("--model", default=None, help="registry reference (default: $VPDSR_MODEL or vpdsr-small@production)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: $VPDSR_METRICS_PORT or 9100)")
    p.add_argument("--metrics-addr", default="0.0.0.0", help="address the metrics endpoint binds (default 0.0.0.0)")
    p.set_defaults(handler=worker)
