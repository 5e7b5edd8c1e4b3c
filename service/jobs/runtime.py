"""Everything one process runs for the job queue: the Redis client, the queue, an optional
consumer and the gauge refresher. The API process and ``vpdsr worker`` both use it."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from jobqueue.consumer import REDIS_DOWN, JobConsumer, JobInput, JobOutput, Processor, Ready, cancel_requested
from jobqueue.metrics import JobMetrics, job_metrics
from jobqueue.queue import JobQueue

from ..schemas import CheckResult
from ..settings import Settings

log = logging.getLogger("vpdsr.jobs")

PRUNE_EVERY_S = 300.0


def connect(url: str, *, block_ms: int = 1000) -> Redis:
    """A client that fails fast when Redis is away: callers decide (503, back-off) instead of
    redis-py's default of ten retries. One retry on a broken connection covers the stale pooled
    connections left by a Redis restart; timeouts are never retried (the command may have run)."""
    return Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=block_ms / 1000 + 5,  # above XREADGROUP's BLOCK
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=30,
    )


def with_delay(processor: Processor, delay_s: float) -> Processor:
    """VPDSR_JOB_TEST_DELAY_S: make every job slow, so tests can kill a worker in the middle of one."""
    if delay_s <= 0:
        return processor

    async def delayed(job: JobInput) -> JobOutput:
        await asyncio.sleep(delay_s)
        return await processor(job)

    return delayed


class JobSystem:
    """The job queue of one process, configured by the service's :class:`~service.settings.Settings`
    (``redis_url``, ``job_*``); disabled, and idle, without ``redis_url``."""

    def __init__(self, settings: Settings, *, metrics: JobMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or job_metrics()
        self.redis: Redis | None = None
        self.queue: JobQueue | None = None
        self.consumer: JobConsumer | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._consumer_stopped: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.jobs_enabled

    async def start(self) -> None:
        """Never fails because Redis is down: the consumer and the gauges wait for it."""
        if not self.enabled:
            log.info("job queue disabled: VPDSR_REDIS_URL is not set")
            return
        cfg = self.settings
        self.redis = connect(cfg.redis_url or "", block_ms=cfg.job_block_ms)
        self.queue = JobQueue(
            self.redis,
            ttl_s=cfg.job_ttl_s,
            visibility_timeout_s=cfg.job_visibility_timeout_s,
            max_attempts=cfg.job_max_attempts,
            stream_maxlen=cfg.job_stream_maxlen,
        )
        self._stats_task = asyncio.create_task(self._stats_loop(), name="job-queue-stats")

    def start_consumer(self, processor: Processor, *, ready: Ready | None = None) -> None:
        """Start consuming (once the model is warm: jobs taken earlier would only wait); ``ready``:
        see :class:`JobConsumer`."""
        if self.queue is None or self.consumer is not None:
            return
        cfg = self.settings
        self.consumer = JobConsumer(
            self.queue,
            with_delay(processor, cfg.job_test_delay_s),
            ready=ready,
            concurrency=cfg.job_concurrency,
            block_ms=cfg.job_block_ms,
            reclaim_interval_s=cfg.job_reclaim_interval_s,
            metrics=self.metrics,
        )
        self.consumer.start()

    def stop_consuming(self, grace_s: float | None = None) -> asyncio.Task[None] | None:
        """Stop taking jobs now (jobs in hand get ``grace_s``); idempotent: the one stop task."""
        if self.consumer is not None and self._consumer_stopped is None:
            grace = self.settings.job_shutdown_grace_s if grace_s is None else grace_s
            self._consumer_stopped = asyncio.create_task(self.consumer.stop(grace), name="vpdsr-stop-consuming")
        return self._consumer_stopped

    async def stop(self, grace_s: float | None = None) -> None:
        stopping = self.stop_consuming(grace_s)
        if stopping is not None:
            await stopping
        if self._stats_task is not None:
            self._stats_task.cancel()
            await asyncio.gather(self._stats_task, return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()

    async def readiness(self, timeout_s: float = 1.0) -> CheckResult:
        """The ``job_queue`` check of ``/readyz``: a Redis ping. Never makes the API unready:
        synchronous upscales work without Redis; the state says whether async jobs do. /readyz is
        unauthenticated: never Redis's own error, which names its host and port."""
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.ping(), timeout_s)
                return CheckResult(ok=True, state="ok")
            except (asyncio.TimeoutError, *REDIS_DOWN):
                pass
        return CheckResult(ok=True, state="unavailable: redis unavailable")

    async def refresh_gauges(self) -> None:
        if self.queue is None:
            return
        stats = await self.queue.stats()
        self.metrics.queue_length.set(stats.length)
        self.metrics.pending.set(stats.pending)

    async def _stats_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + PRUNE_EVERY_S
        while not cancel_requested():
            try:
                await self.refresh_gauges()
                if loop.time() >= next_prune and self.queue is not None:
                    next_prune = loop.time() + PRUNE_EVERY_S
                    idle = max(3600.0, 4 * self.settings.job_visibility_timeout_s)
                    if pruned := await self.queue.prune_consumers(idle):
                        log.info("removed %d idle consumer(s) of departed workers from the group", pruned)
            except REDIS_DOWN:
                pass  # the gauges keep their last values; the readiness check reports the outage
            except Exception:
                log.exception("job queue stats failed")
            await asyncio.sleep(self.settings.job_stats_interval_s)
