"""The FastAPI application: settings, metrics, engine and routers wired together.

The model loads and warms in the background after start-up, so the server answers ``/healthz``
at once (liveness) and ``/readyz`` says 503 until the model is warm (readiness); upscale
requests meanwhile get 503 ``not_ready``. A model that fails to load leaves the server up with
``/readyz`` reporting ``failed`` (the log says why), rather than crash-looping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from jobqueue.metrics import JobMetrics

from .body_timeout import BodyTimeoutMiddleware
from .connections import RequestLimitMiddleware
from .decoding import decoder_for
from .engine import InferenceEngine
from .errors import install_error_handlers
from .jobs.processor import consume_with_engine
from .jobs.runtime import JobSystem
from .methods import HeadAsGetMiddleware
from .prometheus import Metrics, RequestMetricsMiddleware
from .routes import health, jobs as jobs_api, models, upscale, web
from .settings import Settings

log = logging.getLogger("vpdsr.service")

DESCRIPTION = """\
One-step diffusion super-resolution (VPD-SR). `POST /v1/upscale` an image, get it back ×4.

Every error is JSON `{"error": {"code": ..., "message": ...}}`. Requests are batched with others
behind the scenes; a full queue answers 429 with `Retry-After`. See docs/service.md.
"""


class BackgroundWork:
    """What the API does besides answering requests: load the model, then consume jobs.

    Stopping has two steps. :meth:`stop_taking_work` runs the moment exit is requested (see
    :class:`service.server.Server`), before uvicorn waits for connections to drain: a stalled
    upload can hold that drain for ``shutdown_timeout_s``, and a consumer left running meanwhile
    takes new jobs it will not finish. :meth:`stop` runs in the lifespan's shutdown, after the
    drain: the jobs in hand get what is left of their grace period, then the engine stops.
    """

    def __init__(self, engine: InferenceEngine, jobs: JobSystem, settings: Settings) -> None:
        self.engine = engine
        self.jobs = jobs
        self.settings = settings
        self._loading: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """The app's lifespan: start on start-up, stop on shutdown."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        decoder_for(self.settings).start()  # its processes start while the model loads
        await self.jobs.start()
        self._loading = asyncio.create_task(self._load(), name="vpdsr-load-model")

    async def _load(self) -> None:
        try:
            await self.engine.start()
        except Exception:
            log.exception("could not load model %s from %s", self.settings.model, self.settings.registry)
            return
        # Once the model is warm: consume jobs in this process too, unless VPDSR_CONSUME_JOBS=false.
        if self.jobs.enabled and self.settings.consume_jobs:
            consume_with_engine(self.jobs, self.engine)

    def stop_taking_work(self) -> None:
        """Stop loading the model and taking jobs, now; jobs in hand keep running (idempotent)."""
        if self._loading is not None:
            self._loading.cancel()
        self.jobs.stop_consuming()

    async def stop(self) -> None:
        self.stop_taking_work()
        await self.jobs.stop()
        await self.engine.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app, with everything it holds made first: routes get them as dependencies
    (:mod:`service.dependencies`), the lifespan starts and stops them (:class:`BackgroundWork`)."""
    settings = settings or Settings()
    metrics = Metrics()
    engine = InferenceEngine(settings, metrics)
    jobs = JobSystem(settings, metrics=JobMetrics(metrics.registry))  # on /metrics too
    background = BackgroundWork(engine, jobs, settings)

    app = FastAPI(title="VPD-SR", version="0.1.0", description=DESCRIPTION, lifespan=background.lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.jobs = jobs
    app.state.background = background
    # Without VPDSR_REDIS_URL there is no queue to report on (/v1/jobs says so).
    app.state.readiness = {"model": engine.readiness} | ({"job_queue": jobs.readiness} if jobs.enabled else {})
    install_error_handlers(app)
    app.add_middleware(RequestLimitMiddleware, limit=settings.max_connections)  # its 503s are counted
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyTimeoutMiddleware, idle_s=settings.body_idle_timeout_s, total_s=settings.body_timeout_s)
    app.add_middleware(HeadAsGetMiddleware, router=app.router)  # outermost: metrics see HEAD as the GET it runs
    for module in (upscale, models, health, web, jobs_api):
        app.include_router(module.router)
    return app
