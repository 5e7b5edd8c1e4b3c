"""``vpdsr worker`` processes against a private Redis: crash recovery, graceful shutdown, scale-out.

Workers are real subprocesses (``vpdsr worker``) with the tiny model; ``VPDSR_JOB_TEST_DELAY_S``
makes their jobs slow enough to kill or stop them in the middle of one.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis

from service.jobs.queue import DEAD_STREAM, GROUP, STREAM, JobQueue, job_key
from service.settings import Settings
from service.testing import live_server, scrape
from tests.conftest import RedisServer, free_port
from tests.conftest import random_png as png

pytestmark = pytest.mark.timeout(150)

VPDSR = Path(sys.executable).with_name("vpdsr")


class Worker:
    def __init__(self, registry: Path, redis_url: str, log: Path, **env: object) -> None:
        self.metrics_port = free_port()
        self.log = log
        environ = {
            **os.environ,
            "VPDSR_REGISTRY": str(registry),
            "VPDSR_MODEL": "tiny@production",
            "VPDSR_DEVICE": "cpu",
            "VPDSR_REDIS_URL": redis_url,
            "VPDSR_METRICS_PORT": str(self.metrics_port),
            "VPDSR_MAX_BATCH_SIZE": "4",
            "VPDSR_MAX_DELAY_MS": "5",
            "VPDSR_REQUEST_TIMEOUT_S": "2",
            "VPDSR_JOB_VISIBILITY_TIMEOUT_S": "6",
            "VPDSR_JOB_TTL_S": "600",
            "VPDSR_JOB_BLOCK_MS": "100",
            "VPDSR_JOB_RECLAIM_INTERVAL_S": "0.2",
            "VPDSR_JOB_STATS_INTERVAL_S": "0.2",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        environ.update({f"VPDSR_{k.upper()}": str(v) for k, v in env.items()})
        self.out = log.open("wb")
        self.proc = subprocess.Popen([str(VPDSR), "worker"], env=environ, stdout=self.out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker exited: {self.output()}"
            try:
                httpx.get(f"{self.url}/metrics", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"worker not ready: {self.output()}")

    def metric(self, name: str, **labels: str) -> float:
        return scrape(self.url).get((name, frozenset(labels.items())), 0.0)

    def output(self) -> str:
        self.out.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.out.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def job_state(r: Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(job_key(job_id)).items() if k != b"options"}


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout} s")


def submit(redis_url: str, *images: bytes, **options: object) -> list[str]:
    """Queue jobs the way POST /v1/jobs stores them."""

    async def go() -> list[str]:
        from redis.asyncio import Redis as AsyncRedis

        client = AsyncRedis.from_url(redis_url)
        queue = JobQueue(client, ttl_s=600, visibility_timeout_s=6, max_attempts=3, stream_maxlen=1000)
        try:
            return [(await queue.submit(data, None, dict(options))).job.id for data in images]
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_killed_worker_job_is_finished_by_another(tiny_registry: Path, redis_server: RedisServer,
                                                  workers: list[Worker], tmp_path: Path) -> None:
    r = Redis.from_url(redis_server.url)
    slow = Worker(tiny_registry, redis_server.url, tmp_path / "a.log", job_test_delay_s=3)
    workers.append(slow)
    slow.wait_ready()
    [job_id] = submit(redis_server.url, png(16, 1), seed=11)
    wait_for(lambda: job_state(r, job_id)["state"] == "running", what="job running on worker A")

    slow.proc.send_signal(signal.SIGKILL)  # mid-job: no chance to clean up
    slow.proc.wait(10)
    assert job_state(r, job_id)["state"] == "running"
    assert r.xpending(STREAM, GROUP)["pending"] == 1, "left pending, not lost"

    rescuer = Worker(tiny_registry, redis_server.url, tmp_path / "b.log")
    workers.append(rescuer)
    rescuer.wait_ready()
    wait_for(lambda: job_state(r, job_id)["state"] == "succeeded", timeout=30, what="job reclaimed and done")
    job = job_state(r, job_id)
    assert job["attempts"] == "2"
    assert float(job["finished_at"]) - float(job["created_at"]) >= 6, "not before the visibility timeout"
    result = Image.open(io.BytesIO(r.get(f"vpdsr:job:{job_id}:result")))  # type: ignore[arg-type]
    assert result.size == (64, 64)
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    assert rescuer.metric("vpdsr_job_reclaims_total") == 1
    assert rescuer.metric("vpdsr_jobs_total", outcome="succeeded") == 1
    r.close()


def test_sigterm_finishes_jobs_in_hand_then_exits(tiny_registry: Path, redis_server: RedisServer,
                                                  workers: list[Worker], tmp_path: Path) -> None:
    r = Redis.from_url(redis_server.url)
    worker = Worker(tiny_registry, redis_server.url, tmp_path / "w.log", job_test_delay_s=2, job_concurrency=2)
    workers.append(worker)
    worker.wait_ready()
    first, second = submit(redis_server.url, png(16, 1), png(16, 2))
    wait_for(lambda: all(job_state(r, j)["state"] == "running" for j in (first, second)), what="both running")

    stopped_at = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    [late] = submit(redis_server.url, png(16, 3))  # after SIGTERM: must not be taken
    assert worker.proc.wait(20) == 0, worker.output()
    assert time.monotonic() - stopped_at < 10
    for job_id in (first, second):
        job = job_state(r, job_id)
        assert (job["state"], job["attempts"]) == ("succeeded", "1"), "finished, not abandoned"
    assert job_state(r, late)["state"] == "queued" and job_state(r, late)["attempts"] == "0"
    assert r.xpending(STREAM, GROUP)["pending"] == 0, "nothing left pending for a reclaim"
    assert r.xinfo_consumers(STREAM, GROUP) == [], "the worker left the consumer group"
    assert "stopping" in worker.output()
    r.close()


def test_two_hundred_jobs_two_workers(tiny_registry: Path, redis_server: RedisServer,
                                      workers: list[Worker], tmp_path: Path) -> None:
    """Concurrent clients submit 200 jobs through the API (which does not consume); two worker
    processes run them: every job finishes once, with the right result, none lost or duplicated."""
    n = 200
    for name in ("w1", "w2"):
        workers.append(Worker(tiny_registry, redis_server.url, tmp_path / f"{name}.log", job_concurrency=4))
    settings = Settings(
        registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(), max_batch_size=2,
        redis_url=redis_server.url, consume_jobs=False, request_timeout_s=10, job_visibility_timeout_s=30,
    )
    with live_server(settings, torch_threads=1) as url:
        for worker in workers:
            worker.wait_ready()
        started = time.monotonic()
        ids, results = asyncio.run(run_clients(url, n))
        elapsed = time.monotonic() - started

        assert len(ids) == n and len(set(ids.values())) == n, "one job per submission"
        for i, (job_id, (status, content_type, seed, data)) in enumerate(sorted(results.items())):
            assert status["state"] == "succeeded" and status["attempts"] == 1, status
            assert content_type == "image/png" and seed == str(ids_seed(ids, job_id))
            with Image.open(io.BytesIO(data)) as image:
                assert image.size == (64, 64) and image.mode == "RGB"
        # Exactly n model runs across the workers: no job computed twice, none skipped.
        tiles = sum(w.metric("vpdsr_tiles_total") for w in workers)
        done = sum(w.metric("vpdsr_jobs_total", outcome="succeeded") for w in workers)
        assert (tiles, done) == (n, n)
        assert all(w.metric("vpdsr_jobs_total", outcome="succeeded") > 0 for w in workers), "both worked"
        r = Redis.from_url(redis_server.url)
        assert r.xpending(STREAM, GROUP)["pending"] == 0 and r.xlen(DEAD_STREAM) == 0
        assert r.xinfo_groups(STREAM)[0]["lag"] == 0
        r.close()
        # Results are the engine's: a job equals the synchronous upscale of the same input and seed.
        sample = sorted(ids)[:3]
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in sample:
                sync = client.post("/v1/upscale", content=png(16, i), headers={"content-type": "image/png"},
                                   params={"seed": 1000 + i})
                job = np.asarray(Image.open(io.BytesIO(results[ids[i]][3])), dtype=np.int16)
                assert np.abs(job - np.asarray(Image.open(io.BytesIO(sync.content)), dtype=np.int16)).max() <= 1
    print(f"{n} jobs through 2 workers in {elapsed:.1f} s")


def ids_seed(ids: dict[int, str], job_id: str) -> int:
    return 1000 + next(i for i, j in ids.items() if j == job_id)


async def run_clients(url: str, n: int, clients: int = 16):  # type: ignore[no-untyped-def]
    """``clients`` concurrent clients, each submitting its share, polling, then fetching results."""
    ids: dict[int, str] = {}
    results: dict[str, tuple[dict, str, str, bytes]] = {}

    async def client(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            mine = range(k, n, clients)
            for i in mine:
                response = await http.post("/v1/jobs", content=png(16, i), headers={"content-type": "image/png"},
                                           params={"seed": 1000 + i})
                assert response.status_code == 202, response.text
                ids[i] = response.json()["id"]
            for i in mine:
                job_id = ids[i]
                deadline = time.monotonic() + 60
                while (status := (await http.get(f"/v1/jobs/{job_id}")).json())["state"] in ("queued", "running"):
                    assert time.monotonic() < deadline, status
                    await asyncio.sleep(0.1)
                result = await http.get(f"/v1/jobs/{job_id}/result")
                assert result.status_code == 200, result.text
                results[job_id] = (status, result.headers["content-type"], result.headers["x-seed"], result.content)

    await asyncio.gather(*(client(k) for k in range(clients)))
    return ids, results
