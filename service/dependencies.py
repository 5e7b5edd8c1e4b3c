"""What routes get from the app, as FastAPI dependencies: the one place that reads ``app.state``.

:func:`service.app.create_app` puts each object there once; a route declares what it needs
(``settings: SettingsDep``, ``engine: EngineDep``) and FastAPI hands it over, so routes never
reach into the app, and a test can override any of them (``app.dependency_overrides``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from .engine import InferenceEngine
from .jobs.runtime import JobSystem
from .prometheus import Metrics
from .schemas import CheckResult
from .settings import Settings

ReadinessChecks = dict[str, Callable[[], Awaitable[CheckResult]]]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_readiness(request: Request) -> ReadinessChecks:
    """Named readiness checks (``/readyz`` passes when all do): ``model``, and ``job_queue`` with Redis."""
    return request.app.state.readiness


def get_jobs(request: Request) -> JobSystem:
    return request.app.state.jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[InferenceEngine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ReadinessDep = Annotated[ReadinessChecks, Depends(get_readiness)]
JobsDep = Annotated[JobSystem, Depends(get_jobs)]
