"""Liveness, readiness and Prometheus metrics: never behind API keys, never blocked by the model.

Readiness is the conjunction of named checks (a dict of name → async callable returning
:class:`CheckResult`, see :func:`service.dependencies.get_readiness`): ``"model"`` (the engine's),
and ``"job_queue"`` when the Redis job queue is configured.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..dependencies import MetricsDep, ReadinessDep
from ..schemas import CheckResult, HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers HTTP")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/readyz",
    summary="Readiness: model loaded and warmed (and every other registered check passes)",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready; `checks` says what is missing"}},
)
async def readyz(checks: ReadinessDep) -> JSONResponse:
    results: list[CheckResult] = await asyncio.gather(*(check() for check in checks.values()))
    ready = all(result.ok for result in results)
    body = ReadyResponse(status="ready" if ready else "not_ready", checks=dict(zip(checks, results, strict=True)))
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "text format"}},
)
async def metrics(registry: MetricsDep) -> Response:
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
