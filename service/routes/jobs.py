"""``/v1/jobs``: asynchronous upscales through the Redis job queue.

``POST /v1/jobs`` takes exactly what ``POST /v1/upscale`` takes (same body, same options, the
request body and checks of :mod:`service.upscale`) and validates it the same way before anything
is queued, so a bad image or option is a synchronous 4xx, never a failed job. The upload is stored
in Redis as received; a worker (or this process) runs it through the same path and InferenceEngine
at background priority (:mod:`service.jobs.processor`) and stores the encoded result.

Jobs belong to the API key that submitted them (when the server has API keys): another key sees
404 for them, and Idempotency-Keys are scoped the same way.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from jobqueue.consumer import REDIS_DOWN
from jobqueue.keys import JobState
from jobqueue.queue import BacklogFull, JobQueue, JobRecord, fingerprint

from ..dependencies import BearerDep, EngineDep, JobsDep, SettingsDep, require_api_key
from ..engine import EngineState
from ..errors import ERROR_DESCRIPTIONS, ErrorResponse, HttpFailure, InvalidParameters
from ..decoding import decode
from ..failures import Retry
from ..imageio import read_upload
from ..schemas import UpscaleOptions
from ..upscale import BINARY, REQUEST_BODY, ResultMeta, merge_form_fields
from ..jobs.runtime import JobSystem
from .disconnect import unless_disconnected

log = logging.getLogger("vpdsr.jobs")

MAX_IDEMPOTENCY_KEY = 255
RETRY_AFTER_S = 5


# -- errors --------------------------------------------------------------------------------------
class JobsDisabled(HttpFailure):
    status, code, retry = 503, "jobs_disabled", Retry.NEVER


class JobsUnavailable(HttpFailure):
    status, code, retry = 503, "jobs_unavailable", Retry.LATER


class JobNotFound(HttpFailure):
    status, code, retry = 404, "job_not_found", Retry.NEVER


class JobConflict(HttpFailure):
    status = 409

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class IdempotencyKeyReused(HttpFailure):
    status, code, retry = 422, "idempotency_key_reused", Retry.NEVER


class JobQueueFull(HttpFailure):
    status, code, retry = 429, "job_queue_full", Retry.LATER


def _errors(*statuses: int, extra: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    descriptions = ERROR_DESCRIPTIONS | {
        404: "unknown job id, the job expired (job_ttl_s), or it belongs to another API key",
        503: "job queue disabled (`jobs_disabled`: no VPDSR_REDIS_URL) or Redis unreachable "
        "(`jobs_unavailable`, `Retry-After`); POST /v1/upscale still works",
    } | (extra or {})
    return {s: {"model": ErrorResponse, "description": descriptions[s]} for s in statuses}


# -- bodies --------------------------------------------------------------------------------------
class JobErrorInfo(BaseModel):
    code: str
    message: str


class JobResultInfo(BaseModel):
    content_type: str
    size: int
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    model: str | None = None
    version: str | None = None


class JobProgress(BaseModel):
    done: int = Field(ge=0, description="tiles computed")
    total: int = Field(ge=0, description="tiles of the image")


class JobStatus(BaseModel):
    id: str
    state: JobState
    status_url: str
    result_url: str | None = Field(None, description="set once the job succeeded")
    created_at: datetime | None = None
    started_at: datetime | None = Field(None, description="start of the latest attempt")
    finished_at: datetime | None = None
    attempts: int = Field(description="attempts started so far (a retried or reclaimed job has several)")
    error: JobErrorInfo | None = Field(
        None, description="why it failed; on a queued job, why the previous attempt failed"
    )
    result: JobResultInfo | None = None
    progress: JobProgress | None = Field(
        None, description="tiles computed so far, while running (from the attempt's first finished batch, "
        "updated a few times a second) and once succeeded (`done` = `total`)"
    )
    wait_s: float | None = Field(
        None, description="once succeeded: seconds from submission until the computation of the result started "
        "(queueing, waiting for capacity, earlier attempts)"
    )
    compute_s: float | None = Field(None, description="once succeeded: seconds the model computed the result")


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


def status_body(request: Request, job: JobRecord) -> JobStatus:
    status_url = str(request.url_for("get_job", job_id=job.id).path)
    result = None
    if job.state is JobState.SUCCEEDED and job.result_content_type:
        meta = ResultMeta.model_validate(job.result_meta)
        result = JobResultInfo(
            content_type=job.result_content_type, size=job.result_size or 0, width=meta.width, height=meta.height,
            seed=meta.seed, steps=meta.steps, model=meta.model, version=meta.version,
        )
    # A retried (queued again) or failed job still holds its last attempt's progress: not shown.
    progress = job.progress if job.state in (JobState.RUNNING, JobState.SUCCEEDED) else None
    return JobStatus(
        id=job.id,
        state=job.state,
        status_url=status_url,
        result_url=f"{status_url}/result" if job.state is JobState.SUCCEEDED else None,
        created_at=_time(job.created_at),
        started_at=_time(job.started_at),
        finished_at=_time(job.finished_at),
        attempts=job.attempts,
        error=JobErrorInfo(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        result=result,
        progress=JobProgress(done=progress[0], total=progress[1]) if progress else None,
        wait_s=job.wait_s,
        compute_s=job.compute_s,
    )


# -- plumbing ------------------------------------------------------------------------------------
def job_queue(system: JobSystem) -> JobQueue:
    """The queue, or 503 ``jobs_disabled`` (asked in the handler, after the request's own checks)."""
    if not system.enabled or system.queue is None:
        raise JobsDisabled(
            "asynchronous jobs are disabled on this server (no VPDSR_REDIS_URL); use POST /v1/upscale"
        )
    return system.queue


def _unavailable() -> JobsUnavailable:
    return JobsUnavailable(
        # The exception names Redis's host and port: it goes to the log, not to clients.
        "the job queue is unavailable; retry later, or use POST /v1/upscale", retry_after_s=RETRY_AFTER_S
    )


async def job_owner(settings: SettingsDep, credentials: BearerDep) -> str:
    """Who a request's jobs belong to: the SHA-256 of its API key (checked by ``require_api_key``),
    or "" when the server has no API keys. Only a hash is stored, never the key."""
    if not settings.api_keys or credentials is None:
        return ""
    return hashlib.sha256(credentials.credentials.encode()).hexdigest()


Owner = Annotated[str, Depends(job_owner)]


@asynccontextmanager
async def redis_guard() -> AsyncIterator[None]:
    """Turns a Redis outage inside the block into 503 ``jobs_unavailable``."""
    try:
        yield
    except REDIS_DOWN as exc:
        log.warning("job queue unavailable: %r", exc)
        raise _unavailable() from None


router = APIRouter(prefix="/v1", tags=["jobs"], dependencies=[Depends(require_api_key)])


@router.post(
    "/jobs",
    summary="Queue an upscale; poll the job, then fetch its result",
    status_code=202,
    response_model=JobStatus,
    responses={
        200: {"model": JobStatus, "description": "an existing job: same `Idempotency-Key` (and same request)"},
        **_errors(400, 401, 404, 409, 413, 415, 422, 429, 503, extra={
            404: "unknown model reference",
            422: "invalid option, or an `Idempotency-Key` reused for a different request",
            429: "job backlog full (`job_queue_full`): retry after `Retry-After` seconds",
            503: "job queue disabled (`jobs_disabled`) or Redis unreachable or too slow (`jobs_unavailable`, "
            "`Retry-After`). A `jobs_unavailable` answer may still have created the job (Redis applied the "
            "write, its reply was lost): always send an `Idempotency-Key` and resend with the same key",
        }),
    },
    openapi_extra={"requestBody": REQUEST_BODY},
)
async def submit_job(
    request: Request,
    params: Annotated[UpscaleOptions, Query()],
    owner: Owner,
    jobs: JobsDep,
    settings: SettingsDep,
    engine: EngineDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="any client-chosen string (1-255 chars), e.g. a UUID; always send one: resending "
            "the request with it (after a timeout or a 503) returns the same job for job_ttl_s instead "
            "of queuing a duplicate. Scoped to the API key",
        ),
    ] = None,
) -> Response:
    queue = job_queue(jobs)
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidParameters(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    upload = await read_upload(request, settings.max_body_bytes)
    options = merge_form_fields(params, upload.fields)
    # Validate now, like /v1/upscale would, so that bad input is a 4xx here and not a failed job.
    decoded = await unless_disconnected(request, decode(upload.data, settings))
    if engine.state is EngineState.READY:  # options and cost need the model (tiles); else the worker checks
        engine.check_job(decoded.image.width, decoded.image.height, options)
    stored = options.model_dump(exclude_none=True)
    async with redis_guard():
        try:
            submitted = await queue.submit(upload.data, None, stored, idempotency=idempotency_key, owner=owner)
        except BacklogFull as exc:
            raise JobQueueFull(f"{exc}; retry later", retry_after_s=RETRY_AFTER_S) from None
    job = submitted.job
    if not submitted.created and job.fingerprint != fingerprint(upload.data, None, stored):
        # Never name the other job: the key, not the job id, is what the client knows.
        raise IdempotencyKeyReused("Idempotency-Key already used for a different request (other image or "
                                   "options); use a new key for a new request")
    body = status_body(request, job)
    return JSONResponse(
        body.model_dump(mode="json"),
        status_code=202 if submitted.created else 200,
        headers={"Location": body.status_url},
    )


async def existing_job(queue: JobQueue, job_id: str, owner: str) -> JobRecord:
    """The owner's job, or 404 when it never existed, its TTL ran out or another API key owns it."""
    job = await queue.get(job_id)
    if job is None or job.owner != owner:
        raise JobNotFound(f"no job {job_id!r}: unknown, or expired")
    return job


@router.get(
    "/jobs/{job_id}",
    name="get_job",
    summary="A job's state, timestamps, attempts and error",
    response_model=JobStatus,
    responses=_errors(401, 404, 503),
)
async def get_job(request: Request, job_id: str, owner: Owner, jobs: JobsDep) -> JobStatus:
    queue = job_queue(jobs)
    async with redis_guard():
        job = await existing_job(queue, job_id, owner)
    return status_body(request, job)


@router.get(
    "/jobs/{job_id}/result",
    summary="The result image of a succeeded job",
    response_class=Response,
    responses={
        200: {"description": "the upscaled image, as POST /v1/upscale returns it",
              "content": {t: BINARY for t in ("image/png", "image/jpeg", "image/webp")}},
        **_errors(401, 404, 409, 503, extra={409: "the job is not finished (`job_not_ready`), failed "
                                                 "(`job_failed`) or was cancelled (`job_cancelled`)"}),
    },
)
async def get_result(job_id: str, owner: Owner, jobs: JobsDep) -> Response:
    queue = job_queue(jobs)
    async with redis_guard():
        job = await existing_job(queue, job_id, owner)
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            raise JobConflict("job_not_ready", f"job {job_id} is {job.state}; poll {job_id} until it succeeded")
        if job.state is JobState.FAILED:
            raise JobConflict("job_failed", f"job {job_id} failed: {job.error_message or job.error_code}")
        if job.state is JobState.CANCELLED:
            raise JobConflict("job_cancelled", f"job {job_id} was cancelled")
        data = await queue.result(job_id)
    if data is None:
        raise JobNotFound(f"the result of job {job_id!r} expired")
    headers = ResultMeta.model_validate(job.result_meta).headers
    return Response(data, media_type=job.result_content_type or "application/octet-stream", headers=headers)


@router.delete(
    "/jobs/{job_id}",
    summary="Cancel a queued or running job (a running one stops computing)",
    response_model=JobStatus,
    responses=_errors(401, 404, 409, 503, extra={409: "the job already succeeded or failed (`job_not_cancellable`)"}),
)
async def cancel_job(request: Request, job_id: str, owner: Owner, jobs: JobsDep) -> JobStatus:
    queue = job_queue(jobs)
    async with redis_guard():
        outcome, state = await queue.cancel(job_id, owner)
        if outcome == "missing":
            raise JobNotFound(f"no job {job_id!r}: unknown, or expired")
        if outcome == "conflict":
            raise JobConflict("job_not_cancellable", f"job {job_id} already {state}: nothing left to cancel")
        if outcome == "cancelled":
            jobs.metrics.jobs.labels("cancelled").inc()
        job = await existing_job(queue, job_id, owner)
    return status_body(request, job)
