"""What routes get from the app, as FastAPI dependencies: the one place that reads ``app.state``.

:func:`service.app.create_app` puts each object there once; a route declares what it needs
(``settings: SettingsDep``, ``engine: EngineDep``) and FastAPI hands it over, so routes never
reach into the app, and a test can override any of them (``app.dependency_overrides``).

Also the optional API keys: ``Authorization: Bearer <key>`` on ``/v1/*`` when ``api_keys`` is set
(:func:`require_api_key`, a dependency of those routers).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .engine import InferenceEngine
from .errors import Unauthorized
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

bearer = HTTPBearer(auto_error=False, description="one of the server's API keys (only if VPDSR_API_KEYS is set)")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def require_api_key(settings: SettingsDep, credentials: BearerDep) -> None:
    keys = settings.api_keys
    if not keys:
        return
    token = credentials.credentials.encode() if credentials else b""
    # Compare against every key in constant time: no early exit that a timing attack could see.
    matches = [hmac.compare_digest(token, key.get_secret_value().encode()) for key in keys]
    if not token or not any(matches):
        raise Unauthorized(
            "missing or invalid API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
