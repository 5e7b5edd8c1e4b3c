"""The service's job processor: a stored upload + options → the same result as ``POST /v1/upscale``,
computed by the same Engine and batcher, at background priority."""

from __future__ import annotations

import asyncio
import time

from pydantic import ValidationError

from model.errors import VPDSRError

from ..batcher import Priority
from ..engine import Engine
from ..errors import NotReady, Overloaded, ServiceError
from ..routes.upscale import run_upscale
from ..schemas import UpscaleParams
from ..settings import Settings
from .consumer import JobError, JobInput, JobOutput, Processor

# Service errors that the same input would hit again on any worker: fail the job at once.
PERMANENT_STATUSES = frozenset({400, 404, 409, 413, 415, 422})


def make_processor(engine: Engine, settings: Settings) -> Processor:
    async def process(job: JobInput) -> JobOutput:
        try:
            params = UpscaleParams.model_validate(job.options)
        except ValidationError as exc:
            raise JobError("invalid_parameter", f"stored options are invalid: {exc}") from None
        # One attempt may take request_timeout_s (the visibility timeout is validated to exceed it).
        deadline = time.monotonic() + settings.request_timeout_s
        while True:
            try:
                done = await run_upscale(engine, settings, job.data, params, priority=Priority.BACKGROUND,
                                         deadline=deadline)
                break
            except (Overloaded, NotReady) as exc:
                # Busy (the background half of the batch queue is full), or the model is not warm
                # yet: wait within this attempt instead of burning one.
                wait = exc.retry_after if isinstance(exc, Overloaded) else 1.0
                remaining = deadline - time.monotonic()
                if remaining <= wait:
                    raise
                await asyncio.sleep(wait)
            except ServiceError as exc:
                if exc.status in PERMANENT_STATUSES:
                    raise JobError(exc.code, exc.message) from None
                raise
            except VPDSRError as exc:  # the model's own validation (steps, tile, references)
                raise JobError("invalid_parameter", str(exc)) from None
        return JobOutput(done.body, done.media_type, done.meta())

    return process
