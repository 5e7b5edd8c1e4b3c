"""The FastAPI application: settings, metrics, engine and routers wired together.

The model loads and warms in the background after start-up, so the server answers ``/healthz``
at once (liveness) and ``/readyz`` says 503 until the model is warm (readiness); upscale
requests meanwhile get 503 ``not_ready``. A model that fails to load leaves the server up with
``/readyz`` reporting why, rather than crash-looping without a message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .engine import Engine, EngineState
from .errors import install_error_handlers
from .jobs.install import install_jobs, start_consuming
from .metrics import Metrics, RequestMetricsMiddleware
from .routes import health, models, upscale
from .schemas import CheckResult
from .settings import Settings

log = logging.getLogger("vpdsr.service")

DESCRIPTION = """\
One-step diffusion super-resolution (VPD-SR). `POST /v1/upscale` an image, get it back ×4.

Every error is JSON `{"error": {"code": ..., "message": ...}}`. Requests are batched with others
behind the scenes; a full queue answers 429 with `Retry-After`. See docs/service.md.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    engine = Engine(settings, metrics)

    async def start_engine() -> None:
        try:
            await engine.start()
        except Exception:
            log.exception("could not load model %s from %s", settings.model, settings.registry)
            return
        start_consuming(jobs, engine, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await jobs.start()
        loading = asyncio.create_task(start_engine(), name="vpdsr-load-model")
        try:
            yield
        finally:
            loading.cancel()
            await jobs.stop()
            await engine.stop()

    async def model_ready() -> CheckResult:
        state = engine.state.value + (f": {engine.error}" if engine.error else "")
        return CheckResult(ok=engine.state is EngineState.READY, state=state)

    app = FastAPI(title="VPD-SR", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.readiness = {"model": model_ready}
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    for module in (upscale, models, health):
        app.include_router(module.router)
    jobs = install_jobs(app, settings, metrics)
    return app
