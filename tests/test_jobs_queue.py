"""Job queue semantics against a real Redis (the ``redis_server`` fixture) with fake processors.

These pin down the at-least-once contract without a model: acks only after the result is stored,
reclaim after the visibility timeout, dead letters, cancellation, idempotent re-runs, back-pressure,
graceful release and surviving a Redis restart.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from jobqueue.consumer import TRANSIENT_MESSAGE, JobConsumer, JobInput, JobOutput, PermanentJobError
from jobqueue.metrics import JobMetrics
from jobqueue.keys import DEAD_STREAM, GROUP, INFLIGHT, STREAM, job_key, result_key
from jobqueue.queue import BacklogFull, Hold, JobQueue

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def make_queue(redis: Redis, **kw: object) -> JobQueue:
    params: dict = dict(ttl_s=60, visibility_timeout_s=0.5, max_attempts=3, stream_maxlen=1000)
    params.update(kw)
    return JobQueue(redis, **params)


def metrics() -> JobMetrics:
    return JobMetrics(CollectorRegistry())


async def echo(job: JobInput) -> JobOutput:
    return JobOutput(job.data[::-1], "application/x-test", {"attempt": job.attempt})


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def state_is(queue: JobQueue, job_id: str, *states: str) -> bool:
    job = await queue.get(job_id)
    return job is not None and job.state in states


def value(m: JobMetrics, outcome: str) -> float:
    return m.jobs.labels(outcome)._value.get()


@asynccontextmanager
async def running(consumer: JobConsumer) -> AsyncIterator[JobConsumer]:
    """Start ``consumer`` and stop it (1 s grace) on the way out, whatever the test body raised."""
    consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop(1)


async def test_submit_run_and_ack(redis: Redis) -> None:
    queue, m = make_queue(redis), metrics()
    submitted = await queue.submit(b"hello", "image/png", {"seed": 3})
    assert submitted.created and submitted.job.state == "queued" and submitted.job.options == {"seed": 3}
    async with running(JobConsumer(queue, echo, name="c1", metrics=m, block_ms=100)):
        await wait_for(lambda: state_is(queue, submitted.job.id, "succeeded"))
    job = await queue.get(submitted.job.id)
    assert job is not None
    assert job.attempts == 1 and job.result_content_type == "application/x-test" and job.result_meta == {"attempt": 1}
    assert job.created_at <= job.started_at <= job.finished_at  # type: ignore[operator]
    assert job.wait_s is not None and job.compute_s is not None and 0 <= job.wait_s + job.compute_s
    assert await queue.result(job.id) == b"olleh"
    assert not await redis.exists(f"vpdsr:job:{job.id}:input"), "input dropped once the result is stored"
    stats = await queue.stats()
    assert (stats.length, stats.pending) == (0, 0)
    assert await redis.hlen(INFLIGHT) == 0
    assert 0 < await redis.ttl(result_key(job.id)) <= 60
    assert value(m, "succeeded") == 1 and m.duration._sum.get() > 0
    assert await redis.xinfo_consumers(STREAM, GROUP) == [], "an idle consumer leaves the group on stop"


async def test_idempotency_key_returns_the_same_job(redis: Redis) -> None:
    queue = make_queue(redis)
    first = await queue.submit(b"x", "image/png", {}, idempotency="order-42")
    again = await queue.submit(b"x", "image/png", {}, idempotency="order-42")
    other = await queue.submit(b"x", "image/png", {}, idempotency="order-43")
    assert first.created and not again.created and again.job.id == first.job.id
    assert other.created and other.job.id != first.job.id
    assert await redis.xlen(STREAM) == 2


async def test_completing_twice_is_harmless(redis: Redis) -> None:
    """A job run twice (reclaimed from a slow worker that then finishes too) keeps the first result."""
    queue = make_queue(redis)
    job_id = (await queue.submit(b"x", None, {})).job.id
    [delivery] = await queue.read("a", 10, 10)
    assert (await queue.start(delivery, "a")).outcome == "run"
    first = await queue.complete(delivery, b"one", "image/png")
    second = await queue.complete(delivery, b"two", "image/png")
    assert first.outcome == "succeeded" and second.outcome == "duplicate"
    assert await queue.result(job_id) == b"one"
    assert (await queue.fail(delivery, "a", "x", "late failure", retryable=True)).outcome == "duplicate"
    assert await state_is(queue, job_id, "succeeded")


async def test_dead_consumer_is_reclaimed_after_visibility_timeout(redis: Redis) -> None:
    queue, m = make_queue(redis, visibility_timeout_s=0.3), metrics()
    job_id = (await queue.submit(b"abc", None, {})).job.id
    [delivery] = await queue.read("dead-worker", 10, 10)
    assert (await queue.start(delivery, "dead-worker")).attempt == 1  # ... and then it dies
    assert (await queue.stats()).pending == 1
    async with running(JobConsumer(queue, echo, name="b", metrics=m, block_ms=100, reclaim_interval_s=0.1)):
        await wait_for(lambda: state_is(queue, job_id, "succeeded"))
    job = await queue.get(job_id)
    assert job is not None and job.attempts == 2
    assert await queue.result(job_id) == b"cba"
    assert m.reclaims._value.get() == 1
    assert (await queue.stats()).pending == 0


async def test_always_failing_job_is_dead_lettered(redis: Redis) -> None:
    queue, m = make_queue(redis, max_attempts=3), metrics()
    calls: list[int] = []

    async def broken(job: JobInput) -> JobOutput:
        calls.append(job.attempt)
        raise RuntimeError("GPU on fire")

    job_id = (await queue.submit(b"abc", None, {})).job.id
    async with running(JobConsumer(queue, broken, name="c", metrics=m, block_ms=100)):
        await wait_for(lambda: state_is(queue, job_id, "failed"))
    job = await queue.get(job_id)
    assert job is not None and calls == [1, 2, 3] and job.attempts == 3 and job.dead_lettered
    assert job.error_code == "job_error"
    assert job.error_message == f"gave up after 3 attempt(s): {TRANSIENT_MESSAGE}"
    assert "GPU on fire" not in job.error_message, "the exception stays in the log"
    [dead] = await queue.dead_letters()
    assert dead["id"] == job_id and dead["attempts"] == "3" and dead["message"] == job.error_message
    assert value(m, "dead_lettered") == 1 and m.dead_letters._value.get() == 1 and value(m, "failed") == 0
    assert (await queue.stats()).pending == 0 and await redis.hlen(INFLIGHT) == 0


async def test_permanent_error_fails_without_retry(redis: Redis) -> None:
    queue, m = make_queue(redis), metrics()
    calls: list[int] = []

    async def reject(job: JobInput) -> JobOutput:
        calls.append(job.attempt)
        raise PermanentJobError("invalid_image", "not an image")

    job_id = (await queue.submit(b"abc", None, {})).job.id
    async with running(JobConsumer(queue, reject, name="c", metrics=m, block_ms=100)):
        await wait_for(lambda: state_is(queue, job_id, "failed"))
    job = await queue.get(job_id)
    assert job is not None and calls == [1] and not job.dead_lettered
    assert (job.error_code, job.error_message) == ("invalid_image", "not an image")
    assert await redis.xlen(DEAD_STREAM) == 0 and value(m, "failed") == 1


async def test_job_abandoned_too_often_is_dead_lettered(redis: Redis) -> None:
    queue = make_queue(redis, visibility_timeout_s=0.05, max_attempts=2)
    job_id = (await queue.submit(b"abc", None, {})).job.id
    [delivery] = await queue.read("w1", 10, 10)
    assert (await queue.start(delivery, "w1")).outcome == "run"
    for worker in ("w2", "w3"):
        await asyncio.sleep(0.1)
        deliveries, _ = await queue.reclaim(worker, 10)
        started = await queue.start(deliveries[0], worker)
    assert started.outcome == "dead_lettered"
    job = await queue.get(job_id)
    assert job is not None and job.state == "failed" and job.error_code == "worker_lost"
    assert "visibility timeout" in (job.error_message or "")
    assert (await queue.stats()).pending == 0


async def test_cancel(redis: Redis) -> None:
    queue = make_queue(redis)
    queued = (await queue.submit(b"a", None, {})).job.id
    running = (await queue.submit(b"b", None, {})).job.id
    assert await queue.cancel(queued) == ("cancelled", None)
    assert await queue.cancel(queued) == ("already", None)
    deliveries = await queue.read("w", 10, 10)
    started = [await queue.start(d, "w") for d in deliveries]
    assert [s.outcome for s in started] == ["skip", "run"], "a cancelled job is skipped..."
    assert (await queue.stats()).pending == 1, "... and acknowledged"
    assert await queue.cancel(running) == ("cancelled", None), "a running job too"
    assert await queue.touch(deliveries[1], "w") == Hold.CANCELLED
    assert (await queue.complete(deliveries[1], b"late", "image/png")).outcome == "duplicate", "stays cancelled"
    assert (await queue.stats()).pending == 0
    done = (await queue.submit(b"c", None, {})).job.id
    [delivery] = await queue.read("w", 1, 10)
    await queue.start(delivery, "w")
    await queue.complete(delivery, b"result", "image/png")
    assert await queue.cancel(done) == ("conflict", "succeeded")
    assert await queue.cancel("0" * 32) == ("missing", None)
    assert await queue.cancel("../../etc") == ("missing", None)
    assert not await redis.exists(f"vpdsr:job:{queued}:input")


async def test_trimmed_pending_entry_is_requeued(redis: Redis) -> None:
    """MAXLEN trimming can drop the stream entry of a job pending on a dead worker: the job is
    found through the in-flight index and queued again, not lost."""
    queue = make_queue(redis, visibility_timeout_s=0.05, stream_maxlen=3)
    lost = (await queue.submit(b"lost", None, {})).job.id
    [delivery] = await queue.read("dead", 1, 10)
    await queue.start(delivery, "dead")
    for _ in range(300):  # other traffic goes through and pushes the entry out of the stream
        await queue.submit(b"x", None, {})
        [d] = await queue.read("live", 1, 10)
        await queue.start(d, "live")
        await queue.complete(d, b"y", "image/png")
    assert not await redis.xrange(STREAM, delivery.stream_id, delivery.stream_id)
    await asyncio.sleep(0.1)
    deliveries, requeued = await queue.reclaim("rescuer", 10)
    assert (deliveries, requeued) == ([], 1)
    [again] = await queue.read("rescuer", 10, 10)
    assert again.job_id == lost and again.stream_id != delivery.stream_id
    started = await queue.start(again, "rescuer")
    assert started.outcome == "run" and started.data == b"lost" and started.attempt == 2
    await queue.complete(again, b"ok", "image/png")
    assert await queue.result(lost) == b"ok" and await redis.hlen(INFLIGHT) == 0


async def test_backlog_beyond_maxlen_is_refused(redis: Redis) -> None:
    queue = make_queue(redis, stream_maxlen=5)
    for _ in range(5):
        await queue.submit(b"x", None, {})
    with pytest.raises(BacklogFull):
        await queue.submit(b"x", None, {})
    assert (await queue.stats()).length == 5
    await queue.read("w", 1, 10)  # one delivered: room for one more
    await queue.submit(b"x", None, {})


async def test_graceful_stop_releases_jobs_in_hand(redis: Redis) -> None:
    queue, m = make_queue(redis, visibility_timeout_s=60), metrics()
    started = asyncio.Event()

    async def slow(job: JobInput) -> JobOutput:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError

    job_id = (await queue.submit(b"abc", None, {})).job.id
    consumer = JobConsumer(queue, slow, name="c", metrics=m, block_ms=100)
    consumer.start()
    await asyncio.wait_for(started.wait(), 10)
    t0 = time.monotonic()
    await consumer.stop(grace_s=0.2)
    assert time.monotonic() - t0 < 3
    job = await queue.get(job_id)
    assert job is not None and job.state == "queued" and job.attempts == 0, "released, attempt refunded"
    stats = await queue.stats()
    assert (stats.length, stats.pending) == (1, 0), "back in the stream at once, nothing pending"
    done = JobConsumer(queue, echo, name="d", metrics=m, block_ms=100)
    done.start()
    try:
        await wait_for(lambda: state_is(queue, job_id, "succeeded"))
    finally:
        await done.stop(1)


async def test_graceful_stop_waits_for_jobs_in_hand(redis: Redis) -> None:
    queue, m = make_queue(redis), metrics()

    async def quick(job: JobInput) -> JobOutput:
        await asyncio.sleep(0.3)
        return await echo(job)

    ids = [(await queue.submit(bytes([i]), None, {})).job.id for i in range(3)]
    consumer = JobConsumer(queue, quick, name="c", metrics=m, block_ms=100, concurrency=3)
    consumer.start()
    await wait_for(lambda: state_is(queue, ids[-1], "running"))
    await consumer.stop(grace_s=10)
    assert [(await queue.get(i)).state for i in ids] == ["succeeded"] * 3  # type: ignore[union-attr]


async def test_consumer_survives_redis_restart(redis_server, redis: Redis) -> None:
    queue, m = make_queue(redis), metrics()
    async with running(JobConsumer(queue, echo, name="c", metrics=m, block_ms=200)) as consumer:
        first = (await queue.submit(b"1", None, {})).job.id
        await wait_for(lambda: state_is(queue, first, "succeeded"))
        redis_server.stop()
        await wait_for(lambda: asyncio.sleep(0, result=not consumer.connected), 10)
        redis_server.start()  # comes back empty (no persistence in tests): the group is recreated
        second = None

        async def resubmit() -> bool:
            nonlocal second
            try:
                second = second or (await queue.submit(b"2", None, {})).job.id
                return await state_is(queue, second, "succeeded")
            except Exception:
                return False

        await wait_for(resubmit, 20)
        assert consumer.connected


# -- back-pressure, heartbeat, duplicate-execution guards, ownership (issue 15) --------------------
async def test_consumer_takes_no_job_until_ready(redis: Redis) -> None:
    """The ``ready`` hook (the engine's background_ready) is awaited before every read and reclaim:
    a busy processor leaves new jobs in the stream and a dead worker's job pending."""
    queue, m = make_queue(redis, visibility_timeout_s=0.2), metrics()
    orphan = (await queue.submit(b"orphan", None, {})).job.id
    [delivery] = await queue.read("dead", 1, 10)
    await queue.start(delivery, "dead")
    fresh = (await queue.submit(b"fresh", None, {})).job.id
    room = asyncio.Event()
    async with running(JobConsumer(queue, echo, ready=room.wait, name="c", metrics=m, block_ms=50,
                                   reclaim_interval_s=0.05)):
        await asyncio.sleep(0.6)  # three visibility timeouts
        assert (await queue.get(fresh)).state == "queued"  # type: ignore[union-attr]
        assert (await queue.get(orphan)).state == "running"  # type: ignore[union-attr]
        stats = await queue.stats()
        assert (stats.length, stats.pending) == (1, 1), "nothing taken while the processor has no room"
        room.set()
        await wait_for(lambda: state_is(queue, fresh, "succeeded"))
        await wait_for(lambda: state_is(queue, orphan, "succeeded"))
    assert (await queue.get(fresh)).attempts == 1  # type: ignore[union-attr]


async def test_stop_does_not_wait_for_readiness(redis: Redis) -> None:
    queue = make_queue(redis)
    consumer = JobConsumer(queue, echo, ready=asyncio.Event().wait, name="c", metrics=metrics(), block_ms=50)
    consumer.start()
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    await consumer.stop(1)
    assert time.monotonic() - t0 < 1


async def test_long_job_is_not_reclaimed_while_its_worker_lives(redis: Redis) -> None:
    """A job running five visibility timeouts stays with its live consumer (heartbeat), even with
    another consumer reclaiming every 50 ms: one run, one attempt, no reclaim."""
    queue, m = make_queue(redis, visibility_timeout_s=0.3), metrics()
    runs: list[str] = []

    async def long(job: JobInput) -> JobOutput:
        runs.append(job.id)
        await asyncio.sleep(1.5)
        return await echo(job)

    job_id = (await queue.submit(b"abc", None, {})).job.id
    async with running(JobConsumer(queue, long, name="a", metrics=m, block_ms=50, reclaim_interval_s=0.05)):
        await wait_for(lambda: state_is(queue, job_id, "running"))
        async with running(JobConsumer(queue, long, name="b", metrics=m, block_ms=50, reclaim_interval_s=0.05)):
            await wait_for(lambda: state_is(queue, job_id, "succeeded"))
    job = await queue.get(job_id)
    assert job is not None and job.attempts == 1 and runs == [job_id]
    assert m.reclaims._value.get() == 0


async def test_fail_retried_after_a_lost_reply_runs_the_job_once(redis: Redis) -> None:
    """Red team: fail() ran in Redis but its reply timed out; the consumer retries it. The retry must
    not queue the job a second time, else two consumers run it at once. (A visibility timeout far
    above the job's 0.3 s: on a loaded machine 0.5 s lets a live attempt be reclaimed, a third run
    that has nothing to do with the lost reply.)"""
    queue, m = make_queue(redis, visibility_timeout_s=5), metrics()
    real_fail = queue.fail
    replies_lost = 0

    async def reply_lost_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal replies_lost
        finished = await real_fail(*args, **kwargs)
        if not replies_lost:
            replies_lost += 1
            raise RedisTimeoutError("Timeout reading from socket")
        return finished

    queue.fail = reply_lost_once  # type: ignore[method-assign]
    attempts: list[int] = []

    async def flaky(job: JobInput) -> JobOutput:
        attempts.append(job.attempt)
        if job.attempt == 1:
            raise RuntimeError("transient")
        await asyncio.sleep(0.3)  # long enough for a duplicate to start meanwhile
        return await echo(job)

    job_id = (await queue.submit(b"abc", None, {})).job.id
    async with running(JobConsumer(queue, flaky, name="a", metrics=m, block_ms=50)), \
            running(JobConsumer(queue, flaky, name="b", metrics=m, block_ms=50)):
        await wait_for(lambda: state_is(queue, job_id, "succeeded"))
        await asyncio.sleep(0.3)
    assert replies_lost == 1 and attempts == [1, 2]
    assert await redis.xlen(STREAM) == 2, "the submission's entry and one retry"
    assert (await queue.stats()).pending == 0


async def test_superseded_entry_never_starts(redis: Redis) -> None:
    """A second stream entry of one job (as a duplicated fail() used to add) is skipped and acked."""
    queue = make_queue(redis)
    job_id = (await queue.submit(b"abc", None, {})).job.id
    await redis.xadd(STREAM, {"id": job_id})  # a stale duplicate
    first, second = await queue.read("w", 10, 10)
    assert (await queue.start(first, "w")).outcome == "run"
    skipped = await queue.start(second, "w")
    assert (skipped.outcome, skipped.detail) == ("skip", "superseded")
    assert (await queue.stats()).pending == 1, "the stale entry is acknowledged"


async def test_fail_of_a_job_taken_over_is_ignored(redis: Redis) -> None:
    """A consumer that lost its job to a reclaim cannot re-queue it under the new owner's feet."""
    queue = make_queue(redis, visibility_timeout_s=0.05)
    job_id = (await queue.submit(b"abc", None, {})).job.id
    [delivery] = await queue.read("slow", 1, 10)
    await queue.start(delivery, "slow")
    await asyncio.sleep(0.1)
    [taken] = (await queue.reclaim("b", 1))[0]
    assert (await queue.start(taken, "b")).attempt == 2
    assert (await queue.fail(delivery, "slow", "job_error", "late", retryable=True)).outcome == "not_owner"
    job = await queue.get(job_id)
    assert job is not None and job.state == "running" and job.attempts == 2
    assert await redis.xlen(STREAM) == 1 and (await queue.stats()).pending == 1
    assert await queue.touch(delivery, "slow") == Hold.LOST, "the heartbeat of the old owner stops too"
    assert await queue.touch(taken, "b") == Hold.KEPT


async def test_wait_and_compute_times_are_recorded(redis: Redis) -> None:
    queue = make_queue(redis)

    async def timed(job: JobInput) -> JobOutput:
        return JobOutput(b"r", "image/png", waited_s=0.25, compute_s=0.5)

    job_id = (await queue.submit(b"abc", None, {})).job.id
    await asyncio.sleep(0.2)
    async with running(JobConsumer(queue, timed, name="c", metrics=metrics(), block_ms=50)):
        await wait_for(lambda: state_is(queue, job_id, "succeeded"))
    job = await queue.get(job_id)
    assert job is not None and job.compute_s == 0.5
    assert job.wait_s == pytest.approx(job.started_at - job.created_at + 0.25, abs=0.002)  # type: ignore[operator]
    assert job.wait_s >= 0.45  # type: ignore[operator]


async def test_dangling_idempotency_key_is_taken_anew(redis: Redis) -> None:
    """Red team: a key whose job record is gone gave a permanent 500 ('job vanished')."""
    queue = make_queue(redis)
    first = await queue.submit(b"x", None, {}, idempotency="k")
    await redis.delete(job_key(first.job.id))
    again = await queue.submit(b"x", None, {}, idempotency="k")
    assert again.created and again.job.id != first.job.id and again.job.state == "queued"
    assert (await queue.submit(b"x", None, {}, idempotency="k")).job.id == again.job.id


async def test_jobs_and_idempotency_keys_belong_to_their_owner(redis: Redis) -> None:
    queue = make_queue(redis)
    mine = await queue.submit(b"x", None, {}, idempotency="k", owner="a" * 64)
    theirs = await queue.submit(b"y", None, {}, idempotency="k", owner="b" * 64)
    assert theirs.created and theirs.job.id != mine.job.id and theirs.job.owner == "b" * 64
    assert await queue.cancel(mine.job.id, "b" * 64) == ("missing", None)
    assert await queue.cancel(mine.job.id) == ("missing", None)
    assert await queue.cancel(mine.job.id, "a" * 64) == ("cancelled", None)


async def test_progress_is_throttled_and_its_last_value_lands(redis: Redis) -> None:
    """A report after each of 100 batches, 100 a second, through a slow Redis: a report never
    waits for it, a few writes a second reach it, in order, and the record ends at 100/100."""
    queue = make_queue(redis)
    real_progress, written = queue.progress, []

    async def slow(delivery: Any, consumer: str, done: int, total: int) -> bool:
        written.append(done)
        await asyncio.sleep(0.05)
        return await real_progress(delivery, consumer, done, total)

    queue.progress = slow  # type: ignore[method-assign]
    seen: list[tuple[int, int]] = []
    began = time.monotonic()

    async def tiled(job: JobInput) -> JobOutput:
        assert job.progress is not None
        for done in range(1, 101):
            reported = time.monotonic()
            job.progress(done, 100)
            assert time.monotonic() - reported < 0.02
            await asyncio.sleep(0.01)
            record = await queue.get(job.id)
            if record is not None and record.progress is not None:
                seen.append(record.progress)
        return await echo(job)

    job_id = (await queue.submit(b"abc", None, {})).job.id
    async with running(JobConsumer(queue, tiled, name="c", metrics=metrics(), block_ms=50)):
        await wait_for(lambda: state_is(queue, job_id, "succeeded"))
    job = await queue.get(job_id)
    assert job is not None and job.progress == (100, 100)
    assert 3 <= len(written) <= (time.monotonic() - began) / 0.25 + 2, written
    assert written == sorted(written) and written[-1] == 100, written
    assert seen[0][0] < 50 and [d for d, _ in seen] == sorted(d for d, _ in seen), seen
    assert {t for _, t in seen} == {100}


async def test_progress_is_written_only_for_the_running_delivery(redis: Redis) -> None:
    """Guarded like the heartbeat: another consumer, a taken-over delivery, a finished or expired job
    get nothing written (an expired record must not come back as a bare hash); a new attempt
    starts without the last one's progress."""
    queue = make_queue(redis, visibility_timeout_s=0.05)
    job_id = (await queue.submit(b"abc", None, {})).job.id
    [delivery] = await queue.read("a", 1, 10)
    await queue.start(delivery, "a")
    assert await queue.progress(delivery, "a", 3, 9) == Hold.KEPT
    assert await queue.progress(delivery, "b", 4, 9) == Hold.LOST
    assert (await queue.get(job_id)).progress == (3, 9)  # type: ignore[union-attr]

    await asyncio.sleep(0.1)
    [taken] = (await queue.reclaim("b", 1))[0]
    await queue.start(taken, "b")
    assert (await queue.get(job_id)).progress is None  # type: ignore[union-attr]
    assert await queue.progress(delivery, "a", 5, 9) == Hold.LOST, "the old owner's late report"
    assert await queue.progress(taken, "b", 9, 9) == Hold.KEPT
    await queue.complete(taken, b"r", "image/png")
    assert await queue.progress(taken, "b", 1, 9) == Hold.LOST
    assert (await queue.get(job_id)).progress == (9, 9)  # type: ignore[union-attr]

    await redis.delete(job_key(job_id))
    assert await queue.progress(taken, "b", 9, 9) == Hold.LOST and not await redis.exists(job_key(job_id))


async def test_redis_errors_while_writing_progress_do_not_fail_the_job(redis: Redis) -> None:
    queue = make_queue(redis)

    async def down(*_: Any) -> bool:
        raise RedisTimeoutError("Timeout reading from socket")

    queue.progress = down  # type: ignore[method-assign]

    async def tiled(job: JobInput) -> JobOutput:
        assert job.progress is not None
        for done in range(1, 4):
            job.progress(done, 3)
            await asyncio.sleep(0.01)
        return await echo(job)

    job_id = (await queue.submit(b"abc", None, {})).job.id
    async with running(JobConsumer(queue, tiled, name="c", metrics=metrics(), block_ms=50)):
        await wait_for(lambda: state_is(queue, job_id, "succeeded"))
    job = await queue.get(job_id)
    assert job is not None and job.attempts == 1 and job.progress is None
