"""The service's job processor on a real InferenceEngine (tiny model, in-process) and a real Redis: waiting
for the model or for room in the batcher never fails a job or uses up an attempt."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from model import SRPipeline
from service.decoding import decode
from service.engine import InferenceEngine, load_pipeline
from jobqueue.consumer import JobConsumer
from jobqueue.metrics import JobMetrics
from service.jobs.processor import make_processor
from jobqueue.queue import JobQueue
from service.prometheus import Metrics
from service.settings import Settings
from tests.conftest import random_png as png

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[Redis]:  # type: ignore[no-untyped-def]
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_job_waits_for_the_model_and_for_room(tiny_registry: Path, redis: Redis) -> None:
    """A job taken while the model still loads waits for it (NotReady is no failure), then runs
    with more tiles than the whole batch queue holds and longer than a synchronous request may
    take: one attempt, succeeded, the right size, wait and compute times recorded."""
    settings = Settings(registry=tiny_registry, model="tiny@production", device="cpu", max_batch_size=2,
                        max_delay_ms=1, max_queue=4, request_timeout_s=0.2)
    loaded = threading.Event()

    def slow_load() -> SRPipeline:
        loaded.wait(30)
        return load_pipeline(settings)

    engine = InferenceEngine(settings, Metrics(), load=slow_load)
    await decode(png(16, seed=1), settings)  # the decoder's processes are up: the job reaches the engine at once
    queue = JobQueue(redis, ttl_s=60, visibility_timeout_s=5, max_attempts=1, stream_maxlen=100)
    job_id = (await queue.submit(png(80, seed=3), None, {"seed": 5})).job.id  # 16 tiles > max_queue 4
    consumer = JobConsumer(queue, make_processor(engine, settings), name="c", block_ms=50,
                           metrics=JobMetrics(CollectorRegistry()))
    consumer.start()
    starting = asyncio.create_task(engine.start())
    try:
        async with asyncio.timeout(30):
            while (job := await queue.get(job_id)) is not None and job.state == "queued":
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # the job is in the processor, the model still loading
            assert (await queue.get(job_id)).state == "running"  # type: ignore[union-attr]
            loaded.set()
            await starting
            while (job := await queue.get(job_id)) is not None and job.state == "running":
                await asyncio.sleep(0.05)
    finally:
        loaded.set()
        await consumer.stop(1)
        await engine.stop()
    assert job is not None and (job.state, job.attempts) == ("succeeded", 1), job
    assert job.compute_s is not None and job.compute_s > settings.request_timeout_s
    assert job.wait_s is not None and job.wait_s >= 0.3, "the wait for the model counts as waiting"
    with Image.open(io.BytesIO(await queue.result(job_id))) as image:  # type: ignore[arg-type]
        assert image.size == (320, 320)
