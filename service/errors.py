"""Every failure the service reports, and the one JSON shape they all take.

Clients get ``{"error": {"code": ..., "message": ...}}`` with a meaningful status for everything:
our own errors, the model's :class:`~model.errors.VPDSRError`, FastAPI's request validation and
Starlette's 404/405. ``code`` is a stable machine-readable string; ``message`` says what to fix.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import InvalidModelRef, InvalidRequest, ModelNotFound, VPDSRError

from .methods import allowed_methods

log = logging.getLogger("vpdsr.service")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error code, e.g. `queue_full`")
    message: str = Field(description="human-readable explanation")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ServiceError(Exception):
    """An error with its HTTP status, code and optional headers (e.g. ``Retry-After``)."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    """Corrupt or truncated data of a known image format, an empty body, a broken multipart form."""

    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class RequestTimeout(ServiceError):
    """The client stopped sending its body (or sent it too slowly): the connection is closed, so
    that a stalled upload holds neither its buffer nor its connection any longer."""

    status, code = 408, "request_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class ModelNotLoaded(ServiceError):
    """The reference exists in the registry, but this server serves another model."""

    status, code = 409, "model_not_loaded"


class UnknownModel(ServiceError):
    """A reference that names no model of the registry (the message lists none of them)."""

    status, code = 404, "model_not_found"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """A content type other than an image or a multipart form, or bytes of no supported format."""

    status, code = 415, "unsupported_media_type"


class InvalidParameters(ServiceError):
    """Options that pass type validation but not the served model's limits."""

    status, code = 422, "invalid_parameter"


class ClientClosedRequest(ServiceError):
    """The client went away before its answer was ready (nginx's 499; nobody reads the body)."""

    status, code = 499, "client_closed_request"


class Overloaded(ServiceError):
    """Back-pressure: the caller should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(message, headers={"Retry-After": str(self.retry_after)})


class TileQueueFull(Overloaded):
    """The interactive tiles already waiting for the model leave no room for this request in time."""

    status, code = 429, "queue_full"


class TooLargeForSync(ServiceError):
    """An image whose estimated compute exceeds what a synchronous request may take, even on an
    idle server: retrying cannot help, an async job can."""

    status, code = 413, "too_large_for_sync"


class TooLargeForJob(ServiceError):
    """An image whose tiles exceed ``job_max_tiles``: one such job would hold a worker for hours."""

    status, code = 413, "too_large_for_job"


class QueueTimeout(Overloaded):
    """The request's tiles did not start computing before its deadline."""

    status, code = 503, "queue_timeout"


class ComputeOutOfMemory(Overloaded):
    status, code = 503, "out_of_memory"


class NotReady(ServiceError):
    """The model is loading, failed to load, or the server is shutting down."""

    status, code = 503, "not_ready"


class ComputeTimeout(ServiceError):
    """The request started computing but did not finish before its deadline."""

    status, code = 504, "timeout"


class ComputeFailed(ServiceError):
    status, code = 500, "compute_failed"


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


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type to the JSON error shape."""

    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

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
        return error_response(422, "invalid_parameter", _validation_message(exc))

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

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(VPDSRError, model_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
