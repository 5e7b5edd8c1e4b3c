"""The service's job processor: a stored upload + options → the same result as ``POST /v1/upscale``,
through the same path (:func:`service.upscale.run_upscale`), InferenceEngine and batcher, at
background priority.

A job is never failed for the server being busy: the engine feeds a background image into the
batcher chunk by chunk as room frees up, without a deadline, and while the model is not ready
(or the device ran out of memory) the job waits for :meth:`InferenceEngine.background_ready` within
its attempt. Attempts are spent only on real failures.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import ValidationError

from jobqueue.consumer import JobInput, JobOutput, PermanentJobError, Processor
from model.errors import VPDSRError

from ..batcher import Priority
from ..engine import InferenceEngine
from ..errors import (
    BadRequest,
    InvalidParameters,
    ModelNotLoaded,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    TooLargeForJob,
    TooLargeForSync,
    UnknownModel,
    UnsupportedMediaType,
)
from ..schemas import UpscaleParams
from ..settings import Settings
from ..upscale import run_upscale
from .runtime import JobSystem

# The kinds of error that the same input would hit again on any worker: fail the job at once.
# Any other error is a fault of this attempt, and the job is retried.
PERMANENT_ERRORS = (BadRequest, UnknownModel, ModelNotLoaded, PayloadTooLarge, TooLargeForSync, TooLargeForJob,
                    UnsupportedMediaType, InvalidParameters)


def make_processor(engine: InferenceEngine, settings: Settings) -> Processor:
    async def process(job: JobInput) -> JobOutput:
        try:
            params = UpscaleParams.model_validate(job.options)
        except ValidationError as exc:
            raise PermanentJobError("invalid_parameter", "the job's stored options are invalid: "
                                    + "; ".join(err["msg"] for err in exc.errors(include_url=False))) from None
        began = time.monotonic()
        while True:
            tried = time.monotonic()
            try:
                done = await run_upscale(engine, settings, job.data, params, priority=Priority.BACKGROUND,
                                         progress=job.progress)
                break
            except (Overloaded, NotReady) as exc:
                # Out of device memory, or the model is not ready: a wait, not a failed attempt.
                if isinstance(exc, Overloaded):
                    await asyncio.sleep(exc.retry_after)
                await engine.background_ready()
            except PERMANENT_ERRORS as exc:
                raise PermanentJobError(exc.code, exc.message) from None
            except VPDSRError as exc:  # the model's own validation (steps, tile, references)
                raise PermanentJobError("invalid_parameter", str(exc)) from None
        return JobOutput(done.body, done.media_type, done.meta(), waited_s=tried - began + done.queue_ms / 1000,
                         compute_s=done.compute_ms / 1000)

    return process


def consume_with_engine(system: JobSystem, engine: InferenceEngine) -> None:
    """Consume jobs through ``engine``, taking one only when the engine has room for its tiles."""
    system.start_consumer(make_processor(engine, system.settings), ready=engine.background_ready)
