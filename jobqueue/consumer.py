"""The consumer loop: read jobs from the stream, run them through a processor, store results.

Used by the API process (unless ``VPDSR_CONSUME_JOBS=false``) and by ``vpdsr worker``. It knows
nothing about images or models: it calls a :data:`Processor` (bytes + options in, bytes out), so
it is tested with real Redis and a fake processor, and the service plugs in its InferenceEngine.

Guarantees (see docs/jobs.md):

- at-least-once: an entry is acknowledged only in the script that stores the job's final state;
  a consumer that dies leaves it pending and another one takes it over with XAUTOCLAIM once it
  has been idle longer than the visibility timeout;
- a job in hand is never taken over while its consumer lives, however long it runs: a
  :class:`Heartbeat` resets its entry's idle time every visibility timeout / 3;
- at most ``concurrency`` jobs are held at once (so a few jobs can share a batch on the
  InferenceEngine, and a crash strands few), and none is taken while the optional ``ready`` hook says the
  processor has no room (back-pressure: jobs wait in Redis, not in a busy worker's memory);
- Redis going away never kills the loop: it waits with capped, jittered exponential back-off and
  carries on when Redis is back; a finished result is stored with retries until the visibility
  timeout, after which another worker would redo the job anyway;
- a running job's progress (tiles done, reported by the processor) is stored best-effort and
  throttled (:class:`ProgressWriter`); its last value lands before the outcome;
- :meth:`JobConsumer.stop` stops taking jobs, lets the ones in hand finish within a grace period
  and gives the rest back to the queue at once (attempt refunded), or leaves them pending for
  XAUTOCLAIM if Redis cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from .metrics import JobMetrics, job_metrics
from .queue import Delivery, Hold, JobQueue

log = logging.getLogger("vpdsr.jobs")

# Errors that mean "Redis is not there right now" (connection refused / reset, timeouts, a
# server still loading its data, a replica during fail-over). Anything else is a bug.
REDIS_DOWN = (RedisError, OSError)


def cancel_requested() -> bool:
    """Whether the current task has been asked to stop. redis-py (8.2) can swallow the
    CancelledError of a command it is in (the command returns, or fails like an outage), so a
    loop that goes on after a Redis call checks this as well: else it outlives its cancel, and
    whoever awaits it waits for ever (a worker that never exited after SIGTERM)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

Progress = Callable[[int, int], None]  # (tiles done, tiles in total); must not block or raise


@dataclass(frozen=True)
class JobInput:
    id: str
    data: bytes
    content_type: str | None
    options: dict[str, Any]
    attempt: int
    progress: Progress | None = None  # the processor reports the job's progress here


@dataclass(frozen=True)
class JobOutput:
    data: bytes
    content_type: str
    meta: dict[str, Any] = field(default_factory=dict)
    waited_s: float = 0.0  # time the attempt waited for capacity before computing
    compute_s: float | None = None  # None: the attempt's run time after its wait


Processor = Callable[[JobInput], Awaitable[JobOutput]]
Ready = Callable[[], Awaitable[None]]


class PermanentJobError(Exception):
    """A permanent failure (the input or options can never succeed): the job fails at once, without
    retries. Any other exception is taken as transient and retried up to ``max_attempts``: a
    processor gives up or asks for another attempt by the kind of the error it raises."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def consumer_name() -> str:
    """Unique per process, so XAUTOCLAIM knows whose entries it takes over."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Backoff:
    """Capped exponential back-off with full jitter."""

    def __init__(self, base: float = 0.2, cap: float = 10.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.failures)
        self.failures += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.failures = 0


TRANSIENT_MESSAGE = "the worker failed while running this job (a server fault, in its log; not the input's)"


class JobCancelled(Exception):
    """The job's client cancelled it while it ran (:meth:`JobQueue.cancel`)."""


class Heartbeat:
    """Keeps the stream entry of a running job fresh (idle time reset every visibility timeout
    / 3), so that XAUTOCLAIM takes over only the jobs of dead workers, and tells until when an
    outcome may still be stored before another worker could have taken the job over. Sets
    ``cancelled`` when the job's client cancelled it."""

    def __init__(self, queue: JobQueue, delivery: Delivery, consumer: str, cancelled: asyncio.Event) -> None:
        self.queue, self.delivery, self.consumer, self.cancelled = queue, delivery, consumer, cancelled
        self.fresh_until = time.monotonic() + queue.visibility_timeout_s  # delivered just now
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Heartbeat":
        self._task = asyncio.create_task(self._beat(), name=f"job-heartbeat-{self.delivery.job_id}")
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _beat(self) -> None:
        visibility = self.queue.visibility_timeout_s
        while not cancel_requested():
            await asyncio.sleep(visibility / 3)
            touched_at = time.monotonic()
            try:
                hold = await self.queue.touch(self.delivery, self.consumer)
            except REDIS_DOWN as exc:
                log.warning("job %s: heartbeat failed (%s)", self.delivery.job_id, exc)
                continue
            if hold is Hold.CANCELLED:
                self.cancelled.set()
                return
            if hold is Hold.LOST:
                log.warning("job %s: no longer this consumer's running job (taken over, or its stream entry "
                            "trimmed); heartbeat stopped", self.delivery.job_id)
                return
            self.fresh_until = touched_at + visibility


class ProgressWriter:
    """Stores a running job's progress (tiles done, tiles in total) in its record, for whoever
    reads the job's status. Best-effort: a lost write only makes the status lag, so Redis errors are
    logged at debug and ignored; the job never fails for them.

    The engine reports after every batch, synchronously on the event loop, so a report never
    waits for Redis: it notes the value and, unless a writer task is already going, starts one.
    The writer stores the latest value, then pauses ``interval_s`` (a fast model ends many
    batches a second; pollers need a few values a second), then stores whatever came meanwhile.
    Values superseded while a write or pause is under way are dropped. :meth:`flush` cuts the
    pause short and stores the last value: the consumer calls it before recording the outcome,
    after which the record is final and refuses progress. A write that finds the job cancelled
    sets ``cancelled``."""

    def __init__(self, queue: JobQueue, delivery: Delivery, consumer: str, cancelled: asyncio.Event,
                 interval_s: float = 0.25) -> None:
        self.queue, self.delivery, self.consumer, self.interval_s = queue, delivery, consumer, interval_s
        self.cancelled = cancelled
        self._latest: tuple[int, int] | None = None
        self._stored: tuple[int, int] | None = None
        self._hurry = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    def __call__(self, done: int, total: int) -> None:
        self._latest = (done, total)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=f"job-progress-{self.delivery.job_id}")

    async def _write(self) -> None:
        while (value := self._latest) is not None and value != self._stored and not cancel_requested():
            try:
                if await self.queue.progress(self.delivery, self.consumer, *value) is Hold.CANCELLED:
                    self.cancelled.set()
            except REDIS_DOWN as exc:
                log.debug("job %s: progress %d/%d not stored (%s)", self.delivery.job_id, *value, exc)
            self._stored = value
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), self.interval_s)

    async def flush(self) -> None:
        """Store the latest value now (one write at a time, so it lands after any earlier one)."""
        self._hurry.set()
        if self._writer is not None:
            await self._writer

    async def __aenter__(self) -> "ProgressWriter":
        return self

    async def __aexit__(self, *_: object) -> None:
        """Without a flush (the attempt failed or was cancelled) pending values are not wanted."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)


class JobConsumer:
    def __init__(
        self,
        queue: JobQueue,
        processor: Processor,
        *,
        ready: Ready | None = None,
        name: str | None = None,
        concurrency: int = 4,
        block_ms: int = 1000,
        reclaim_interval_s: float | None = None,
        metrics: JobMetrics | None = None,
    ) -> None:
        """``ready``: awaited before each read or reclaim of jobs; returns once the processor can
        take more work (the service's ``InferenceEngine.background_ready``)."""
        self.queue = queue
        self.processor = processor
        self.ready = ready
        self.name = name or consumer_name()
        self.concurrency = max(1, concurrency)
        self.block_ms = block_ms
        vis = queue.visibility_timeout_s
        self.reclaim_interval_s = reclaim_interval_s or min(30.0, max(0.2, vis / 4))
        self.metrics = metrics or job_metrics()
        self.connected = False
        self._stopping = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], Delivery] = {}
        self._loop_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self.run(), name=f"job-consumer-{self.name}")

    def abort_in_flight(self) -> None:
        """Cancel the jobs in hand now (each is handed back to the queue); used by a second SIGTERM."""
        for task in list(self._tasks):
            task.cancel()

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop taking jobs; give those in hand ``grace_s`` to finish, then hand them back."""
        self._stopping.set()
        if self._loop_task is not None:
            try:  # the loop notices within one XREADGROUP block
                await asyncio.wait_for(asyncio.shield(self._loop_task), self.block_ms / 1000 + 5)
            except asyncio.TimeoutError:
                self._loop_task.cancel()
                await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._tasks:
            log.info("job consumer %s: waiting up to %.0f s for %d job(s)", self.name, grace_s, len(self._tasks))
            _, still = await asyncio.wait(list(self._tasks), timeout=grace_s)
            for task in still:  # each one releases its job when cancelled
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        try:  # tidy: a consumer with nothing pending can leave the group
            await self.queue.forget_consumer(self.name)
        except REDIS_DOWN:
            pass
        log.info("job consumer %s stopped", self.name)

    # -- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set() and not cancel_requested():
            try:
                await self.queue.ensure_group()
                if not self.connected:
                    log.info("job consumer %s: consuming %s", self.name, "vpdsr:jobs")
                self.connected = True
                backoff.reset()
                await self._consume()
            except REDIS_DOWN as exc:
                delay = backoff.next()
                if self.connected or backoff.failures == 1:
                    log.warning("job consumer %s: Redis unavailable (%s); retrying", self.name, exc)
                self.connected = False
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            except Exception:  # a bug: log it, keep the consumer alive
                log.exception("job consumer %s: unexpected error", self.name)
                await asyncio.sleep(1.0)

    async def _consume(self) -> None:
        next_reclaim = 0.0
        while not self._stopping.is_set() and not cancel_requested():
            if self.concurrency - len(self._tasks) <= 0:
                await asyncio.wait(list(self._tasks), timeout=self.reclaim_interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                continue
            if not await self._until_ready():
                return
            free = self.concurrency - len(self._tasks)
            if time.monotonic() >= next_reclaim:
                deliveries, requeued = await self.queue.reclaim(self.name, free)
                if deliveries or requeued:
                    self.metrics.reclaims.inc(len(deliveries) + requeued)
                    log.warning("job consumer %s: reclaimed %d job(s) from dead or stalled consumers",
                                self.name, len(deliveries) + requeued)
                for delivery in deliveries:
                    self._spawn(delivery)
                # A full batch may mean more are waiting: look again at once.
                next_reclaim = 0.0 if len(deliveries) == free else time.monotonic() + self.reclaim_interval_s
                if deliveries:
                    continue  # the processor's room changed: ask again before reading
            for delivery in await self.queue.read(self.name, free, self.block_ms):
                if self._stopping.is_set():  # arrived while stopping: not ours to run any more
                    await self._release(delivery)
                else:
                    self._spawn(delivery)

    async def _until_ready(self) -> bool:
        """Wait until the processor can take work (the ``ready`` hook); False if stopped first."""
        if self.ready is None:
            return True
        ready = asyncio.ensure_future(self.ready())
        await _first_of(ready, asyncio.ensure_future(self._stopping.wait()))
        if not ready.cancelled():
            ready.result()  # the hook's own failure (e.g. the engine stopped) goes to run()
        return not self._stopping.is_set()

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._handle(delivery), name=f"job-{delivery.job_id}")
        self._tasks[task] = delivery
        task.add_done_callback(self._tasks.pop)

    # -- one job ---------------------------------------------------------------------------------
    async def _handle(self, delivery: Delivery) -> None:
        try:
            started = await self.queue.start(delivery, self.name)
        except REDIS_DOWN as exc:  # still pending: XAUTOCLAIM brings it back
            log.warning("job %s: could not start (%s); left pending", delivery.job_id, exc)
            return
        if started.outcome == "skip":
            log.debug("job %s: skipped (%s)", delivery.job_id, started.detail)
            return
        if started.outcome == "dead_lettered":
            self._dead_lettered(delivery.job_id, started.message)
            return
        if started.outcome == "failed":
            self.metrics.jobs.labels("failed").inc()
            log.warning("job %s failed: %s", delivery.job_id, started.message)
            return

        cancelled = asyncio.Event()
        async with Heartbeat(self.queue, delivery, self.name, cancelled) as beat, \
                ProgressWriter(self.queue, delivery, self.name, cancelled) as progress:
            job = JobInput(delivery.job_id, started.data, started.content_type, started.options, started.attempt,
                           progress)
            await self._run(delivery, job, beat, progress)

    async def _run(self, delivery: Delivery, job: JobInput, beat: Heartbeat, progress: ProgressWriter) -> None:
        """One attempt: the processor, its last progress, then its outcome stored."""
        try:
            output = await _unless_cancelled(self.processor(job), beat.cancelled)
            await progress.flush()
        except asyncio.CancelledError:
            await self._release(delivery)
            raise
        except JobCancelled:
            log.info("job %s: cancelled by its client while running; its remaining work dropped", delivery.job_id)
            await self._release(delivery)  # the job is final: this only acknowledges its entry
            return
        except PermanentJobError as exc:
            await self._record(delivery, beat, self.queue.fail, delivery, self.name, exc.code, exc.message,
                               retryable=False)
            return
        except Exception as exc:
            # The exception's text can name files, hosts or devices: the log has it, the job's
            # client (who reads the error) gets what happened.
            log.exception("job %s: attempt %d failed", delivery.job_id, job.attempt)
            await self._record(delivery, beat, self.queue.fail, delivery, self.name, "job_error", TRANSIENT_MESSAGE,
                               retryable=True)
            return
        await self._record(delivery, beat, self.queue.complete, delivery, output.data, output.content_type,
                           output.meta, waited_s=output.waited_s, compute_s=output.compute_s)

    async def _record(self, delivery: Delivery, beat: Heartbeat, fn: Callable[..., Awaitable[Any]],
                      *args: Any, **kwargs: Any) -> None:
        """Store an outcome, retrying while Redis is away (until another worker could reclaim it)."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                finished = await fn(*args, **kwargs)
                break
            except asyncio.CancelledError:
                await self._release(delivery)
                raise
            except REDIS_DOWN as exc:
                if time.monotonic() >= beat.fresh_until:
                    log.error("job %s: could not store the outcome (%s); left pending for another worker",
                              delivery.job_id, exc)
                    return
                await asyncio.sleep(min(backoff.next(), max(0.0, beat.fresh_until - time.monotonic())))
        outcome = finished.outcome
        if outcome == "succeeded":
            self.metrics.jobs.labels("succeeded").inc()
            if finished.duration_s is not None:
                self.metrics.duration.observe(max(0.0, finished.duration_s))
        elif outcome == "failed":
            self.metrics.jobs.labels("failed").inc()
            log.info("job %s failed: %s", delivery.job_id, finished.message)
        elif outcome == "dead_lettered":
            self._dead_lettered(delivery.job_id, finished.message)
        elif outcome == "retry":
            log.info("job %s: queued again for another attempt", delivery.job_id)
        else:  # duplicate / missing / stale / not_owner: finished, expired, re-queued or taken over
            log.info("job %s: outcome not stored (%s)", delivery.job_id, outcome)

    def _dead_lettered(self, job_id: str, message: str | None) -> None:
        self.metrics.jobs.labels("dead_lettered").inc()
        self.metrics.dead_letters.inc()
        log.error("job %s dead-lettered: %s", job_id, message)

    async def _release(self, delivery: Delivery) -> None:
        """Hand a job back (shutdown), or let go of a cancelled one; if Redis is away, it stays
        pending for XAUTOCLAIM."""
        try:
            outcome = await asyncio.shield(self.queue.release(delivery, self.name))
            log.info("job %s: released (%s)", delivery.job_id, outcome)
        except (asyncio.CancelledError, *REDIS_DOWN):
            log.warning("job %s: left pending on shutdown", delivery.job_id)


async def _first_of(work: asyncio.Future[Any], stop: asyncio.Future[Any]) -> None:
    """Wait until ``work`` or ``stop`` is done, then cancel the other and reap both (also when this
    wait itself is cancelled), so neither outlives it: ``work.cancelled()`` then says who won."""
    try:
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, stop):
            task.cancel()
        await asyncio.gather(work, stop, return_exceptions=True)


async def _unless_cancelled(work: Awaitable[JobOutput], cancelled: asyncio.Event) -> JobOutput:
    """The processor's output, or :class:`JobCancelled` as soon as ``cancelled`` is set: the
    processor is cancelled, so the engine drops the job's tiles that have not run yet."""
    processing = asyncio.ensure_future(work)
    await _first_of(processing, asyncio.ensure_future(cancelled.wait()))
    if processing.cancelled():
        raise JobCancelled()
    return processing.result()
