"""The service's job processor: a stored upload + options → the same result as ``POST /v1/upscale``,
through the same path (:func:`service.upscale.run_upscale`), InferenceEngine and batcher, at
background priority.

A failure decides by its :class:`~service.failures.Retry` what becomes of the job, never by what a
transport would answer. A job is never failed for the server being busy: the engine feeds a
background image into the batcher chunk by chunk as room frees up, without a deadline, and while
the model is not ready (or the device ran out of memory) the job waits for
:meth:`InferenceEngine.background_ready` within its attempt. Attempts are spent only on real
failures; a request at fault (its image, its options, its size) fails at once.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import ValidationError

from jobqueue.consumer import JobInput, JobOutput, PermanentJobError, Processor
from model.errors import VPDSRError

from ..batcher import Priority
from ..engine import InferenceEngine
from ..failures import Failure, Retry
from ..schemas import UpscaleOptions
from ..settings import Settings
from ..upscale import run_upscale
from .runtime import JobSystem


def make_processor(engine: InferenceEngine, settings: Settings) -> Processor:
    async def process(job: JobInput) -> JobOutput:
        try:
            params = UpscaleOptions.model_validate(job.options)
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
            except Failure as exc:
                # By what a retry can do: a request at fault fails for good; a fault of this attempt
                # spends it (the consumer retries); a busy or unready server is a wait, not an attempt.
                if exc.retry is Retry.NEVER:
                    raise PermanentJobError(exc.code, exc.message) from None
                if exc.retry is Retry.AGAIN:
                    raise
                if exc.retry_after_s is not None:
                    await asyncio.sleep(exc.retry_after_s)
                await engine.background_ready()
            except VPDSRError as exc:  # the model's own validation (steps, tile, references)
                raise PermanentJobError("invalid_parameter", str(exc)) from None
        meta = done.meta
        return JobOutput(done.body, meta.media_type, meta.model_dump(mode="json"),
                         waited_s=tried - began + meta.queue_ms / 1000, compute_s=meta.compute_ms / 1000)

    return process


def consume_with_engine(system: JobSystem, engine: InferenceEngine) -> None:
    """Consume jobs through ``engine``, taking one only when the engine has room for its tiles."""
    system.start_consumer(make_processor(engine, system.settings), ready=engine.background_ready)
