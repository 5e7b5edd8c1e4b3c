"""``vpdsr worker``: the InferenceEngine and batcher of the API, no HTTP, consuming the Redis job queue.

One process, one event loop, one model on one device; scale out with more processes / pods
(each is a consumer of the group ``vpdsr-workers``). Nothing here forks: CUDA cannot survive a
``fork()`` once initialised, so the process pins multiprocessing to ``spawn`` before the model
loads, in case any library starts helpers.

Lifecycle: load and warm the model → serve Prometheus metrics on ``metrics_port`` (so the
probes on :9100 pass only once the worker can work) → consume. On SIGTERM / SIGINT: stop taking
jobs, let the jobs in hand finish for up to ``job_shutdown_grace_s``, hand the rest back to the
queue, exit 0. A second signal skips the grace period (jobs are still handed back).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
from typing import Any

from prometheus_client import start_http_server

from jobqueue.metrics import JobMetrics
from model.errors import VPDSRError

from ..decoding import close_decoders
from ..engine import InferenceEngine
from ..prometheus import Metrics
from ..settings import Settings
from .processor import consume_with_engine
from .runtime import JobSystem

log = logging.getLogger("vpdsr.jobs")


def check_worker_settings(settings: Settings) -> None:
    """A worker always consumes (``consume_jobs`` is the API process's switch), so it needs a job queue."""
    if not settings.jobs_enabled:
        raise VPDSRError("vpdsr worker needs a job queue: set VPDSR_REDIS_URL (e.g. redis://localhost:6379/0)")


async def run_worker(settings: Settings, *, metrics_addr: str = "0.0.0.0") -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        log.info("received %s: %s", signal.Signals(signum).name,
                 "stopping (send it again to skip the grace period)" if signals == 1
                 else "skipping the grace period")
        if signals > 1 and system.consumer is not None:
            system.consumer.abort_in_flight()
        stop.set()

    metrics = Metrics()
    engine = InferenceEngine(settings, metrics)
    system = JobSystem(settings, metrics=JobMetrics(metrics.registry))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    loading = asyncio.create_task(engine.start(), name="vpdsr-load-model")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await engine.stop()
        log.info("stopped before the model was loaded")
        return 0
    stopping.cancel()
    if loading.exception() is not None:
        await engine.stop()
        raise VPDSRError(f"could not load model {settings.model}: {loading.exception()}")

    server: Any = start_http_server(settings.metrics_port, addr=metrics_addr, registry=metrics.registry)
    await system.start()
    consume_with_engine(system, engine)
    assert system.consumer is not None
    log.info(
        "worker %s consuming vpdsr:jobs (group vpdsr-workers) with %d concurrent job(s); metrics on %s:%d",
        system.consumer.name, settings.job_concurrency, metrics_addr, settings.metrics_port,
    )
    await stop.wait()
    await system.stop(0 if signals > 1 else settings.job_shutdown_grace_s)
    await engine.stop()
    close_decoders()
    if isinstance(server, tuple):  # prometheus_client >= 0.20: (server, thread)
        server[0].shutdown()
    log.info("worker stopped")
    return 0


def main(settings: Settings, *, metrics_addr: str = "0.0.0.0") -> int:
    check_worker_settings(settings)
    try:
        multiprocessing.set_start_method("spawn", force=True)
    except RuntimeError:
        pass
    return asyncio.run(run_worker(settings, metrics_addr=metrics_addr))
