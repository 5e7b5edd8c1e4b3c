"""``/v1/jobs`` over real HTTP: uvicorn on a free port, the tiny model, a private Redis."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from jobqueue.consumer import JobConsumer, JobInput, JobOutput
from jobqueue.keys import STREAM
from jobqueue.metrics import JobMetrics
from jobqueue.queue import Hold, JobQueue
from service.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.conftest import random_png as png
from tests.live import live_server, scrape

pytestmark = pytest.mark.timeout(120)

# Consumer knobs for tests: react within 0.1-0.2 s instead of 1-5 s.
FAST_JOBS = {"job_block_ms": 100, "job_stats_interval_s": 0.2, "job_reclaim_interval_s": 0.2}


def make_settings(registry: Path, **kw: object) -> Settings:
    base: dict = dict(
        registry=registry, model="tiny@production", device="cpu", port=free_port(), max_batch_size=2,
        max_delay_ms=5, request_timeout_s=10, job_visibility_timeout_s=30, job_ttl_s=600, max_pixels=256 * 256,
        **FAST_JOBS,
    )
    base.update(kw)
    return Settings(**base)


@contextmanager
def serve(settings: Settings) -> Iterator[httpx.Client]:
    with live_server(settings, torch_threads=1) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tiny_registry: Path, redis_module: RedisServer) -> Iterator[httpx.Client]:
    """An API that also consumes jobs (db 0)."""
    with serve(make_settings(tiny_registry, redis_url=redis_module.url)) as c:
        yield c


@pytest.fixture(scope="module")
def idle(tiny_registry: Path, redis_module: RedisServer) -> Iterator[httpx.Client]:
    """An API that only queues (VPDSR_CONSUME_JOBS=false), on its own database (db 1)."""
    url = redis_module.url.rsplit("/", 1)[0] + "/1"
    with serve(make_settings(tiny_registry, redis_url=url, consume_jobs=False)) as c:
        yield c


@pytest.fixture
def idle_redis(redis_module: RedisServer) -> Iterator[SyncRedis]:
    r = SyncRedis.from_url(redis_module.url.rsplit("/", 1)[0] + "/1")
    r.flushdb()
    yield r
    r.close()


def submit(client: httpx.Client, data: bytes, key: str | None = None, **params: object) -> httpx.Response:
    headers = {"content-type": "image/png"} | ({"Idempotency-Key": key} if key else {})
    return client.post("/v1/jobs", content=data, headers=headers, params=params)


def wait_state(client: httpx.Client, job_id: str, *states: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if body["state"] in states:
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {body['state']}")


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def test_submit_poll_and_fetch_result(client: httpx.Client) -> None:
    data = png(16, seed=1)
    response = submit(client, data, seed=7)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] in ("queued", "running", "succeeded")
    assert body["status_url"] == f"/v1/jobs/{body['id']}" == response.headers["location"]
    status = wait_state(client, body["id"], "succeeded")
    assert status["attempts"] == 1 and status["error"] is None
    assert status["wait_s"] >= 0 and status["compute_s"] > 0
    assert status["created_at"] <= status["started_at"] <= status["finished_at"]
    assert status["result_url"] == f"/v1/jobs/{body['id']}/result"
    assert status["result"] | {"size": 0} == {
        "content_type": "image/png", "size": 0, "width": 64, "height": 64, "seed": 7, "steps": 1,
        "model": "tiny", "version": "1",
    }

    result = client.get(status["result_url"])
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    assert (result.headers["x-seed"], result.headers["x-model"]) == ("7", "tiny")
    assert len(result.content) == status["result"]["size"]
    # The same engine as /v1/upscale: same input and seed, same image.
    sync = client.post("/v1/upscale", content=data, headers={"content-type": "image/png"}, params={"seed": 7})
    job_pixels = np.asarray(Image.open(io.BytesIO(result.content)), dtype=np.int16)
    sync_pixels = np.asarray(Image.open(io.BytesIO(sync.content)), dtype=np.int16)
    assert job_pixels.shape == (64, 64, 3) and np.abs(job_pixels - sync_pixels).max() <= 1


def test_progress_rises_to_the_total_while_a_job_runs(client: httpx.Client) -> None:
    """A 128² image is 25 tiles, run in batches of 2: polled while the job runs, its progress rises
    from the first batch to done == total, which the succeeded job keeps."""
    job_id = submit(client, png(128, seed=3)).json()["id"]
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    while (body := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, body
        if body["progress"]:
            assert body["state"] == "running"
            seen.append((body["progress"]["done"], body["progress"]["total"]))
        time.sleep(0.02)
    assert body["state"] == "succeeded", body
    total = body["progress"]["total"]
    assert total == 25 and body["progress"]["done"] == total
    done = [d for d, _ in seen]
    assert {t for _, t in seen} == {total} and done == sorted(done), seen
    assert done[0] <= total // 4 and len(set(done)) >= 3, seen
    # No seed was sent: the job drew one, and says which (in its record and on its result).
    seed = body["result"]["seed"]
    assert 0 <= seed < 2**53 and client.get(body["result_url"]).headers["x-seed"] == str(seed)


def test_options_and_multipart_as_for_upscale(client: httpx.Client) -> None:
    response = client.post(
        "/v1/jobs", params={"format": "png"}, files={"image": ("a.png", png(16, 2), "image/png")},
        data={"format": "jpeg", "scale": "2", "quality": "80"},
    )
    assert response.status_code == 202, response.text
    status = wait_state(client, response.json()["id"], "succeeded")
    result = client.get(status["result_url"])
    assert result.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(result.content)).size == (32, 32)


def test_idempotency_key_gives_one_job(client: httpx.Client, redis_module: RedisServer) -> None:
    r = SyncRedis.from_url(redis_module.url)
    before = r.xlen(STREAM)
    data = png(16, seed=3)
    first = submit(client, data, key="upload-3")
    second = submit(client, data, key="upload-3")
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert r.xlen(STREAM) == before + 1, "one stream entry: no duplicate job"
    # The same key for a different request is a client bug, not a silent replay.
    error = assert_error(submit(client, png(16, seed=4), key="upload-3"), 422, "idempotency_key_reused")
    assert first.json()["id"] not in error["message"], "never echo another request's job id"
    assert_error(submit(client, data, key="x" * 256), 422, "invalid_parameter")
    wait_state(client, first.json()["id"], "succeeded")
    r.close()


def test_validation_errors_are_synchronous(idle: httpx.Client, idle_redis: SyncRedis) -> None:
    assert_error(submit(idle, b"not an image"), 415, "unsupported_media_type")
    assert_error(submit(idle, png(16)[:40]), 400, "bad_request")
    assert_error(submit(idle, png(300)), 413, "payload_too_large")
    assert_error(submit(idle, png(16), steps=0), 422, "invalid_parameter")
    assert_error(submit(idle, png(16), tile=24), 422, "invalid_parameter")  # not a warmed tile size
    assert_error(submit(idle, png(16), steps=999), 422, "invalid_parameter")  # beyond the model
    assert_error(submit(idle, png(16), model="nope"), 404, "model_not_found")
    assert_error(idle.post("/v1/jobs", content=png(16), headers={"content-type": "text/plain"}), 415,
                 "unsupported_media_type")
    assert idle_redis.xlen(STREAM) == 0, "nothing queued"


def test_not_ready_cancel_and_not_found(idle: httpx.Client, idle_redis: SyncRedis) -> None:
    job_id = submit(idle, png(16)).json()["id"]
    assert_error(idle.get(f"/v1/jobs/{job_id}/result"), 409, "job_not_ready")
    cancelled = idle.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert idle.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled", "cancelling twice is fine"
    assert_error(idle.get(f"/v1/jobs/{job_id}/result"), 409, "job_cancelled")
    for path in ("/v1/jobs/0123456789abcdef0123456789abcdef", "/v1/jobs/x", "/v1/jobs/x/result"):
        assert_error(idle.get(path), 404, "job_not_found")
    assert_error(idle.delete("/v1/jobs/0123456789abcdef0123456789abcdef"), 404, "job_not_found")
    assert_error(idle.get("/v1/jobs/0123456789abcdef0123456789abcdef/result"), 404, "job_not_found")
    metrics = scrape(str(idle.base_url).rstrip("/"))
    assert metrics[("vpdsr_jobs_total", frozenset({("outcome", "cancelled")}))] == 1


async def test_running_job_is_cancelled_and_failures_are_reported(
    idle: httpx.Client, idle_redis: SyncRedis, redis_module: RedisServer
) -> None:
    """A consumer outside the API (a fake worker on the same Redis) runs the jobs."""
    redis = Redis.from_url(redis_module.url.rsplit("/", 1)[0] + "/1")
    queue = JobQueue(redis, ttl_s=600, visibility_timeout_s=30, max_attempts=2, stream_maxlen=100)
    http = httpx.AsyncClient(base_url=idle.base_url, timeout=30)
    try:
        running, job_id = [(await http.post("/v1/jobs", content=png(16, seed),
                                            headers={"content-type": "image/png"})).json()["id"] for seed in (1, 2)]
        first, delivery = await queue.read("fake-worker", 2, 100)
        assert first.job_id == running and (await queue.start(first, "fake-worker")).outcome == "run"
        assert (await queue.start(first, "fake-worker")).attempt == 1, "the same start again: the same attempt"
        cancelled = await http.delete(f"/v1/jobs/{running}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert await queue.touch(first, "fake-worker") == Hold.CANCELLED, "the worker learns it"
        assert await queue.progress(first, "fake-worker", 1, 2) == Hold.CANCELLED
        assert (await queue.release(first, "fake-worker")) == "skip", "letting go only acks the entry"
        assert_error(await http.get(f"/v1/jobs/{running}/result"), 409, "job_cancelled")

        async def broken(job: JobInput) -> JobOutput:
            raise RuntimeError("CUDA error: an illegal memory access at /srv/secret/model.py")

        assert (await queue.start(delivery, "fake-worker")).outcome == "run"
        await queue.fail(delivery, "fake-worker", "job_error", "first attempt lost", retryable=True)
        consumer = JobConsumer(queue, broken, name="broken", block_ms=100, metrics=JobMetrics(None))
        consumer.start()
        try:
            for _ in range(200):
                status = (await http.get(f"/v1/jobs/{job_id}")).json()
                if status["state"] == "failed":
                    break
                await asyncio.sleep(0.05)
        finally:
            await consumer.stop(1)
        assert status["state"] == "failed" and status["attempts"] == 2
        assert status["error"]["code"] == "job_error"
        assert "gave up after 2 attempt(s)" in status["error"]["message"]
        error = assert_error(await http.get(f"/v1/jobs/{job_id}/result"), 409, "job_failed")
        for message in (status["error"]["message"], error["message"]):
            assert "illegal memory access" not in message and "/srv" not in message, "server internals stay in the log"
        [dead] = await queue.dead_letters()
        assert dead["id"] == job_id
    finally:
        await http.aclose()
        await redis.aclose()


def test_metrics_and_readiness(client: httpx.Client) -> None:
    job_id = submit(client, png(16, seed=9)).json()["id"]
    wait_state(client, job_id, "succeeded")
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["job_queue"] == {"ok": True, "state": "ok"}
    time.sleep(0.3)  # one gauge refresh
    metrics = scrape(str(client.base_url).rstrip("/"))
    names = {name for name, _ in metrics}
    assert {
        "vpdsr_jobs_total", "vpdsr_job_duration_seconds_bucket", "vpdsr_job_queue_length", "vpdsr_job_pending",
        "vpdsr_job_reclaims_total", "vpdsr_job_dead_letters_total",
    } <= names
    assert metrics[("vpdsr_jobs_total", frozenset({("outcome", "succeeded")}))] >= 1
    assert metrics[("vpdsr_job_queue_length", frozenset())] == 0
    assert metrics[("vpdsr_job_duration_seconds_bucket", frozenset({("le", "120.0")}))] >= 1


def test_without_redis_jobs_are_disabled(tiny_registry: Path) -> None:
    with serve(make_settings(tiny_registry, redis_url=None)) as c:
        assert_error(submit(c, png(16)), 503, "jobs_disabled")
        assert_error(c.get("/v1/jobs/0123456789abcdef0123456789abcdef"), 503, "jobs_disabled")
        ready = c.get("/readyz")
        assert ready.status_code == 200 and "job_queue" not in ready.json()["checks"]
        assert c.post("/v1/upscale", content=png(16), headers={"content-type": "image/png"}).status_code == 200


def test_redis_outage_and_recovery(tiny_registry: Path, redis_server: RedisServer) -> None:
    with serve(make_settings(tiny_registry, redis_url=redis_server.url)) as c:
        before = submit(c, png(16, seed=5)).json()["id"]
        wait_state(c, before, "succeeded")

        redis_server.stop()
        upscale = c.post("/v1/upscale", content=png(16), headers={"content-type": "image/png"})
        assert upscale.status_code == 200, "synchronous upscales do not need Redis"
        down = submit(c, png(16))
        assert_error(down, 503, "jobs_unavailable")
        assert down.headers["retry-after"] == "5"
        assert_error(c.get(f"/v1/jobs/{before}"), 503, "jobs_unavailable")
        ready = c.get("/readyz")
        assert ready.status_code == 200, "the API stays ready: /v1/upscale works"
        assert ready.json()["checks"]["job_queue"]["state"].startswith("unavailable")

        redis_server.start()  # back, empty (no persistence in tests)
        deadline = time.monotonic() + 20
        while (response := submit(c, png(16, seed=6))).status_code != 202:
            assert time.monotonic() < deadline, response.text
            time.sleep(0.1)
        wait_state(c, response.json()["id"], "succeeded", timeout=20)  # the consumer reconnected
        assert c.get("/readyz").json()["checks"]["job_queue"]["state"] == "ok"


@pytest.fixture(scope="module")
def keyed(tiny_registry: Path, redis_module: RedisServer) -> Iterator[str]:
    """An API with two API keys that only queues, on database 2; yields its base URL."""
    url = redis_module.url.rsplit("/", 1)[0] + "/2"
    settings = make_settings(tiny_registry, redis_url=url, consume_jobs=False, api_keys="key-a,key-b")
    with serve(settings) as c:
        yield str(c.base_url)


def test_jobs_belong_to_their_api_key(keyed: str) -> None:
    """Red team: with API keys on, client B read and cancelled client A's jobs, and a reused
    Idempotency-Key showed B the id of A's job."""
    with httpx.Client(base_url=keyed, timeout=30, headers={"Authorization": "Bearer key-a"}) as a, \
            httpx.Client(base_url=keyed, timeout=30, headers={"Authorization": "Bearer key-b"}) as b:
        mine = submit(a, png(16, seed=1), key="order-1")
        assert mine.status_code == 202, mine.text
        job_id = mine.json()["id"]
        theirs = submit(b, png(16, seed=2), key="order-1")  # the same key, another client
        assert theirs.status_code == 202, "a new job of B's own, not a 422 about A's"
        assert theirs.json()["id"] != job_id and job_id not in theirs.text
        for response in (b.get(f"/v1/jobs/{job_id}"), b.get(f"/v1/jobs/{job_id}/result"),
                         b.delete(f"/v1/jobs/{job_id}")):
            assert_error(response, 404, "job_not_found")
        assert a.get(f"/v1/jobs/{job_id}").json()["state"] == "queued", "B's DELETE cancelled nothing"
        assert submit(a, png(16, seed=1), key="order-1").json()["id"] == job_id, "A's key still A's"
        assert a.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"


def test_dangling_idempotency_key_is_not_an_error(idle: httpx.Client, idle_redis: SyncRedis) -> None:
    """Red team: a key whose job record is gone gave a permanent 500 ('job vanished')."""
    first = submit(idle, png(16), key="gone").json()["id"]
    idle_redis.delete(f"vpdsr:job:{first}")
    again = submit(idle, png(16), key="gone")
    assert again.status_code == 202, again.text
    assert again.json()["id"] != first
    assert submit(idle, png(16), key="gone").json()["id"] == again.json()["id"]
