"""Wiring of the job queue into the FastAPI app (called from :func:`service.app.create_app`)."""

from __future__ import annotations

from fastapi import FastAPI

from ..engine import Engine
from ..metrics import Metrics
from ..schemas import CheckResult
from ..settings import Settings
from .api import router
from .metrics import JobMetrics
from .runtime import JobSystem
from .settings import JobConfig


def install_jobs(app: FastAPI, settings: Settings, metrics: Metrics) -> JobSystem:
    """Mount ``/v1/jobs``, add the ``job_queue`` readiness check; start/stop the result in the lifespan.

    Raises :class:`~service.jobs.settings.JobConfigError` for settings that cannot work together."""
    system = JobSystem(JobConfig.from_settings(settings), metrics=JobMetrics(metrics.registry))
    app.state.jobs = system

    async def job_queue_ready() -> CheckResult:
        # Never makes the API unready: synchronous upscales work without Redis. The state says
        # whether async jobs do (ok | unavailable: ...).
        # /readyz is unauthenticated: never Redis's own error, which names its host and port.
        check = await system.check()
        return CheckResult(ok=True, state="ok" if check["status"] == "ok" else "unavailable: redis unavailable")

    if system.enabled:  # without VPDSR_REDIS_URL there is no queue to report on (/v1/jobs says so)
        app.state.readiness["job_queue"] = job_queue_ready
    app.include_router(router)
    return system


def start_consuming(system: JobSystem, engine: Engine, settings: Settings) -> None:
    """Once the model is warm: consume jobs in this process too, unless VPDSR_CONSUME_JOBS=false."""
    if system.enabled and settings.consume_jobs:
        from .processor import consume_with_engine

        consume_with_engine(system, engine, settings)
