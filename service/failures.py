"""Why an upscale did not happen, in the service's own words: no transport in them.

The engine, the upscale path (:mod:`service.upscale`), image decoding and the job processor raise
these. Each says what happened (:attr:`Failure.code`, a stable machine-readable name, and a
message for a person) and whether trying again can help (:attr:`Failure.retry`, and after how
long: :attr:`Failure.retry_after_s`). What a transport makes of them is its own business:
:mod:`service.errors` alone maps them to HTTP statuses, headers and bodies, and the job processor
(:mod:`service.jobs.processor`) decides from :attr:`Failure.retry` alone whether a job waits, is
attempted again, or fails for good.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar


class Retry(Enum):
    """Whether the same request, sent again, can succeed."""

    NEVER = "never"  # the request itself is at fault: it fails the same way anywhere, at any time
    LATER = "later"  # the server cannot take it now (busy, loading, out of memory): wait, then send it again
    AGAIN = "again"  # this attempt failed (a fault, a deadline): another attempt may succeed


class Failure(Exception):
    """An upscale that did not happen: what went wrong, and whether and when a retry can help.

    ``retry_after_s``, when the failure knows it, is in whole seconds and at least one: an estimate
    finer than that promises a precision it does not have, and a retry sooner never helps."""

    code: ClassVar[str] = "internal_error"
    retry: ClassVar[Retry] = Retry.AGAIN

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = None if retry_after_s is None else max(1, math.ceil(retry_after_s))


# -- the input -----------------------------------------------------------------------------------
class UnreadableInput(Failure):
    """Corrupt or truncated data of a known image format, an empty body, a broken form."""

    code, retry = "bad_request", Retry.NEVER


class InputTooLarge(Failure):
    """More bytes or pixels than the server's limits take."""

    code, retry = "payload_too_large", Retry.NEVER


class UnsupportedInput(Failure):
    """A content type other than an image or a form, or bytes of no supported image format."""

    code, retry = "unsupported_media_type", Retry.NEVER


class InvalidOptions(Failure):
    """Options of the wrong type, or outside the served model's limits (steps, tile, scale, shape)."""

    code, retry = "invalid_parameter", Retry.NEVER

    @classmethod
    def from_errors(cls, errors: Iterable[Mapping[str, Any]]) -> InvalidOptions:
        """Pydantic's validation errors as one failure: ``form.seed: Input should be a valid integer; …``."""
        parts = []
        for err in errors:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return cls("; ".join(parts) or "invalid request")


class UnknownModel(Failure):
    """A reference that names no model of the registry (the message lists none of them)."""

    code, retry = "model_not_found", Retry.NEVER


class ModelNotLoaded(Failure):
    """The reference exists in the registry, but this server serves another model."""

    code, retry = "model_not_loaded", Retry.NEVER


# -- its cost ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instead:
    """What can get done an image that a synchronous request cannot: the server's job queue when it
    has one; else an operator's higher limit (``setting``, e.g. ``VPDSR_MAX_QUEUE to 40 or more``)."""

    jobs: bool
    setting: str


class TooLargeForSync(Failure):
    """An image whose estimated compute exceeds what a synchronous request may take, even on an
    idle server: retrying cannot help, a background job can (:attr:`instead`)."""

    code, retry = "too_large_for_sync", Retry.NEVER

    def __init__(self, message: str, instead: Instead) -> None:
        super().__init__(message)
        self.instead = instead


class TooLargeForJob(Failure):
    """An image whose tiles exceed ``job_max_tiles``: one such job would hold a worker for hours."""

    code, retry = "too_large_for_job", Retry.NEVER


# -- the server's state ----------------------------------------------------------------------------
class TileQueueFull(Failure):
    """The interactive tiles already waiting for the model leave no room for this request in time."""

    code, retry = "queue_full", Retry.LATER


class QueueTimeout(Failure):
    """The request's tiles did not start computing before its deadline."""

    code, retry = "queue_timeout", Retry.LATER


class ComputeOutOfMemory(Failure):
    """The model device ran out of memory on a batch holding this request's tiles."""

    code, retry = "out_of_memory", Retry.LATER


class NotReady(Failure):
    """The model is loading, failed to load, or the server is shutting down."""

    code, retry = "not_ready", Retry.LATER


class ComputeTimeout(Failure):
    """The request started computing but did not finish before its deadline; :attr:`instead` says
    what gets an interactive request of that size done."""

    code, retry = "timeout", Retry.AGAIN

    def __init__(self, message: str, instead: Instead | None = None) -> None:
        super().__init__(message)
        self.instead = instead


class ComputeFailed(Failure):
    """The model raised on this request's tiles alone (a server fault, in its log)."""

    code, retry = "compute_failed", Retry.AGAIN
