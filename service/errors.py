"""Every failure the service reports, and the one JSON shape they all take.

Clients get ``{"error": {"code": ..., "message": ...}}`` with a meaningful status for everything:
the upscale's failures (:mod:`service.failures`, which know nothing of HTTP: their statuses,
``Retry-After`` and the API's pointers are added here, by :func:`http_answer`), failures of the HTTP
exchange itself (:class:`HttpFailure`), the model's :class:`~model.errors.VPDSRError`, FastAPI's
request validation and Starlette's 404/405. ``code`` is a stable machine-readable string;
``message`` says what to fix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import InvalidModelRef, InvalidRequest, ModelNotFound, VPDSRError

from . import failures
from .failures import Failure, Instead, InvalidOptions
from .methods import allowed_methods

log = logging.getLogger("vpdsr.service")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error code, e.g. `queue_full`")
    message: str = Field(description="human-readable explanation")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HttpFailure(Failure):
    """A failure of the HTTP exchange itself (authentication, the body's transfer, the job API, a
    page's asset), not of an upscale: it names its own status and headers."""

    status: ClassVar[int] = 500

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.headers = dict(headers or {})


# The names image decoding (service/imageio.py, service/decoding.py) raises and catches failures under.
ServiceError = Failure
BadRequest = failures.UnreadableInput
PayloadTooLarge = failures.InputTooLarge
UnsupportedMediaType = failures.UnsupportedInput
InvalidParameters = InvalidOptions


class Unauthorized(HttpFailure):
    status, code = 401, "unauthorized"


class RequestTimeout(HttpFailure):
    """The client stopped sending its body (or sent it too slowly): the connection is closed, so
    that a stalled upload holds neither its buffer nor its connection any longer."""

    status, code = 408, "request_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class ClientClosedRequest(HttpFailure):
    """The client went away before its answer was ready (nginx's 499; nobody reads the body)."""

    status, code = 499, "client_closed_request"


# The status of each failure of an upscale (a failure's class or its nearest listed base decides).
STATUSES: dict[type[Failure], int] = {
    failures.UnreadableInput: 400,
    failures.UnknownModel: 404,
    failures.ModelNotLoaded: 409,
    failures.InputTooLarge: 413,
    failures.TooLargeForSync: 413,
    failures.TooLargeForJob: 413,
    failures.UnsupportedInput: 415,
    InvalidOptions: 422,
    failures.TileQueueFull: 429,
    failures.ComputeFailed: 500,
    failures.NotReady: 503,
    failures.QueueTimeout: 503,
    failures.ComputeOutOfMemory: 503,
    failures.ComputeTimeout: 504,
}

# What a failure's message leaves to the transport: where on this API to look next.
_HINTS: dict[type[Failure], str] = {failures.UnknownModel: "GET /v1/models says which model this server serves"}


def _advice(instead: Instead) -> str:
    """What to do with an image too large for a synchronous request on this server."""
    local = ("run `vpdsr upscale INPUT OUTPUT` where the model is installed (the same model, "
             "no time limit, with a progress bar)")
    if instead.jobs:
        return ("To get it done: send the same request to POST /v1/jobs (a job has no time limit; poll it "
                f"for the result), or {local}")
    return (f"To get it done: {local}; or ask the server's operator for the job queue (VPDSR_REDIS_URL, then "
            f"POST /v1/jobs) or a higher limit ({instead.setting}); or send a smaller image")


@dataclass(frozen=True)
class ErrorAnswer:
    """A failure as the HTTP API answers it."""

    status: int
    code: str
    message: str
    retry_after: int | None = None  # seconds, sent as ``Retry-After``
    headers: Mapping[str, str] = field(default_factory=dict)  # any others, e.g. ``WWW-Authenticate``

    def response(self) -> JSONResponse:
        retry = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return error_response(self.status, self.code, self.message, {**self.headers, **retry})


def http_answer(failure: Failure) -> ErrorAnswer:
    """The status, body and headers of ``failure``: the one place a failure meets HTTP."""
    if isinstance(failure, HttpFailure):
        return ErrorAnswer(failure.status, failure.code, failure.message, failure.retry_after_s, failure.headers)
    kind = next(k for k in type(failure).__mro__ if k in STATUSES or k is Failure)
    message = failure.message
    if kind in _HINTS:
        message = f"{message}: {_HINTS[kind]}"
    if isinstance(failure, (failures.TooLargeForSync, failures.ComputeTimeout)) and failure.instead is not None:
        message = f"{message} {_advice(failure.instead)}"
    return ErrorAnswer(STATUSES.get(kind, 500), failure.code, message, failure.retry_after_s)


# Model-side errors are user mistakes too: map each to the status that says so.
_MODEL_ERRORS: dict[type[VPDSRError], tuple[int, str]] = {
    ModelNotFound: (404, "model_not_found"),
    InvalidModelRef: (422, "invalid_model_ref"),
    InvalidRequest: (422, "invalid_parameter"),
}

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}

# OpenAPI ``responses=`` entries, so the docs list every error a route can answer with.
ERROR_DESCRIPTIONS = {
    400: "corrupt or truncated image of a known format, empty body, malformed multipart form",
    401: "missing or wrong `Authorization: Bearer` API key",
    404: "unknown model reference",
    408: "the request body stalled for `body_idle_timeout_s`, or took longer than `body_timeout_s`",
    409: "the model exists in the registry but this server serves another one",
    413: "body over `max_body_bytes`, image over `max_pixels`, or too much compute for a synchronous request (`too_large_for_sync`: use `/v1/jobs`)",
    415: "content type is not an image or multipart form, or the bytes are no supported image format",
    422: "invalid option (type, range, steps, tile size, model reference syntax)",
    429: "queue full: retry after `Retry-After` seconds",
    503: "model not ready, out of memory, or the request could not start before its timeout (`Retry-After`)",
    504: "the request started but did not finish before its timeout",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message)).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type to the JSON error shape."""

    async def failure(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Failure)
        return http_answer(exc).response()

    async def model_error(_: Request, exc: Exception) -> JSONResponse:
        status, code = next(
            (sc for kind, sc in _MODEL_ERRORS.items() if isinstance(exc, kind)), (500, "model_error")
        )
        if status == 500:  # e.g. a checkpoint error names files: the log has it
            log.error("model error: %s", exc)
            return error_response(status, code, "the model could not be used (a server fault, in its log)")
        return error_response(status, code, str(exc))

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return http_answer(InvalidOptions.from_errors(exc.errors())).response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        headers = dict(exc.headers or {})
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.url.path}"
        elif exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app.router, request.scope))
            message = f"method {request.method} not allowed on {request.url.path}; allowed: {headers['Allow']}"
        return error_response(exc.status_code, code, message, headers)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")

    app.add_exception_handler(Failure, failure)
    app.add_exception_handler(VPDSRError, model_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
