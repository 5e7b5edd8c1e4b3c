"""``vpdsr worker`` processes against a private Redis: crash recovery, graceful shutdown, scale-out,
back-pressure under load.

Workers are real subprocesses (``vpdsr worker``) with the tiny model; ``VPDSR_JOB_TEST_DELAY_S``
makes their jobs slow enough to kill or stop them in the middle of one. The load tests use the
micro model (about ten times cheaper than tiny), so that hundreds of jobs run in a minute.
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
import pytest
from PIL import Image
from redis import Redis

from model.config import AutoencoderConfig, DDConfig, ModelConfig, UNetConfig
from jobqueue.keys import DEAD_STREAM, GROUP, STREAM, job_key
from jobqueue.queue import JobQueue
from service.settings import Settings
from tests.conftest import RedisServer, free_port, save_tiny_model
from tests.conftest import random_png as png
from tests.live import live_server, scrape

pytestmark = pytest.mark.timeout(240)

MICRO = ModelConfig(
    unet=UNetConfig(image_size=16, model_channels=32, attention_resolutions=(), channel_mult=(1,),
                    num_res_blocks=(1,), num_head_channels=16, swin_embed_dim=32, swin_depth=1, window_size=4,
                    lq_size=16),
    autoencoder=AutoencoderConfig(embed_dim=3, n_embed=16, ddconfig=DDConfig(
        resolution=32, ch=4, ch_mult=(1, 1, 1), num_res_blocks=1, norm_groups=4, attn_type="none")),
    inference_steps=1,
    kind="student",
)


@pytest.fixture(scope="module")
def micro_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``micro:1`` (alias production): a 1024² image is 1849 tiles, about 30 s on one CPU core."""
    root = tmp_path_factory.mktemp("micro")
    save_tiny_model(root, name="micro", config=MICRO)
    return root


def micro_worker(registry: Path, redis_url: str, log: Path, **env: object) -> Worker:
    return Worker(registry, redis_url, log, model="micro@production", max_batch_size=8, **env)


def micro_settings(registry: Path, redis_url: str, **kw: object) -> Settings:
    base: dict = dict(registry=registry, model="micro@production", device="cpu", port=free_port(),
                      max_batch_size=8, redis_url=redis_url)
    return Settings(**(base | kw))

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
        environ.update({f"VPDSR_{k.upper()}": str(v) for k, v in env.items() if v is not None})
        for name in (k for k, v in env.items() if v is None):  # None: the setting's default
            environ.pop(f"VPDSR_{name.upper()}")
        self.out = log.open("wb")
        self.proc = subprocess.Popen([str(VPDSR), "worker"], env=environ, stdout=self.out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def wait_ready(self) -> None:
        """Until its metrics answer, however long a loaded machine takes to import PyTorch and load
        the model; at once if it exits (the test's timeout bounds a hang)."""
        while True:
            assert self.proc.poll() is None, f"worker exited: {self.output()}"
            try:
                httpx.get(f"{self.url}/metrics", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)

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


def wait_for(predicate, timeout: float | None = None, what: str = "condition",  # type: ignore[no-untyped-def]
             watch: tuple[Worker, ...] = ()) -> None:
    """Poll until ``predicate()``: a condition, not a number of seconds, so that a loaded machine
    only makes it slower. Fails at once when a worker in ``watch`` exits, after ``timeout`` only
    where the test means a bound; otherwise the test's timeout bounds a hang."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not predicate():
        for worker in watch:
            assert worker.proc.poll() is None, f"worker exited while waiting for {what}: {worker.output()}"
        if deadline is not None and time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        time.sleep(0.05)


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
    wait_for(lambda: job_state(r, job_id)["state"] == "running", what="job running on worker A", watch=(slow,))

    slow.proc.send_signal(signal.SIGKILL)  # mid-job: no chance to clean up
    slow.proc.wait(10)
    assert job_state(r, job_id)["state"] == "running"
    assert r.xpending(STREAM, GROUP)["pending"] == 1, "left pending, not lost"

    rescuer = Worker(tiny_registry, redis_server.url, tmp_path / "b.log")
    workers.append(rescuer)
    rescuer.wait_ready()
    wait_for(lambda: job_state(r, job_id)["state"] == "succeeded", what="job reclaimed and done", watch=(rescuer,))
    job = job_state(r, job_id)
    assert job["attempts"] == "2"
    assert float(job["finished_at"]) - float(job["created_at"]) >= 6, "not before the visibility timeout"
    result = Image.open(io.BytesIO(r.get(f"vpdsr:job:{job_id}:result")))  # type: ignore[arg-type]
    assert result.size == (64, 64)
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    assert rescuer.metric("vpdsr_job_reclaims_total") == 1
    assert rescuer.metric("vpdsr_jobs_total", outcome="succeeded") == 1
    r.close()


def test_dead_workers_job_resumes_within_a_minute_by_default(tiny_registry: Path, redis_server: RedisServer,
                                                             workers: list[Worker], tmp_path: Path) -> None:
    """Red team (issue 30): a SIGKILLed worker's jobs waited 10 minutes (visibility timeout 600 s).
    With the default visibility timeout and reclaim interval another worker resumes one within 60 s."""
    defaults = {"job_visibility_timeout_s": None, "job_reclaim_interval_s": None}
    r = Redis.from_url(redis_server.url)
    doomed = Worker(tiny_registry, redis_server.url, tmp_path / "a.log", job_test_delay_s=300, **defaults)
    workers.append(doomed)
    doomed.wait_ready()
    [job_id] = submit(redis_server.url, png(16, 1))
    wait_for(lambda: job_state(r, job_id)["state"] == "running", what="job running on the doomed worker")
    rescuer = Worker(tiny_registry, redis_server.url, tmp_path / "b.log", **defaults)
    workers.append(rescuer)
    rescuer.wait_ready()
    doomed.proc.send_signal(signal.SIGKILL)
    killed_at = float(r.time()[0]) + r.time()[1] / 1e6  # Redis's clock: the job's timestamps use it
    wait_for(lambda: job_state(r, job_id)["state"] == "succeeded", timeout=90, what="job resumed and done")
    job = job_state(r, job_id)
    assert job["attempts"] == "2" and f"-{rescuer.proc.pid}-" in job["consumer"]
    assert float(job["started_at"]) - killed_at < 60, "resumed within a minute"
    r.close()


def test_sigterm_finishes_jobs_in_hand_then_exits(tiny_registry: Path, redis_server: RedisServer,
                                                  workers: list[Worker], tmp_path: Path) -> None:
    r = Redis.from_url(redis_server.url)
    worker = Worker(tiny_registry, redis_server.url, tmp_path / "w.log", job_test_delay_s=2, job_concurrency=2)
    workers.append(worker)
    worker.wait_ready()
    first, second = submit(redis_server.url, png(16, 1), png(16, 2))
    wait_for(lambda: all(job_state(r, j)["state"] == "running" for j in (first, second)), what="both running",
             watch=(worker,))

    stopped_at = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "received SIGTERM" in worker.output(), what="the worker's log of SIGTERM", watch=(worker,))
    [late] = submit(redis_server.url, png(16, 3))  # after SIGTERM: must not be taken
    assert worker.proc.wait() == 0, worker.output()
    grace = Settings().job_shutdown_grace_s
    assert time.monotonic() - stopped_at < grace, "exited when its jobs were done, not after the grace period"
    for job_id in (first, second):
        job = job_state(r, job_id)
        assert (job["state"], job["attempts"]) == ("succeeded", "1"), "finished, not abandoned"
    assert job_state(r, late)["state"] == "queued" and job_state(r, late)["attempts"] == "0"
    assert r.xpending(STREAM, GROUP)["pending"] == 0, "nothing left pending for a reclaim"
    assert r.xinfo_consumers(STREAM, GROUP) == [], "the worker left the consumer group"
    assert "stopping" in worker.output()
    r.close()


def jobs(r: Redis, ids: list[str]) -> list[dict[str, str]]:
    """State, consumer and attempts of each job, in one round trip."""
    pipe = r.pipeline()
    for job_id in ids:
        pipe.hmget(job_key(job_id), "state", "consumer", "attempts")
    return [{"state": (s or b"").decode(), "consumer": (c or b"").decode(), "attempts": int(a or 0)}
            for s, c, a in pipe.execute()]


def count(r: Redis, ids: list[str], state: str) -> int:
    return sum(job["state"] == state for job in jobs(r, ids))


def runs_on(worker: Worker, job: dict[str, str]) -> bool:
    """Consumer names are ``<host>-<pid>-<random>``."""
    return job["state"] == "running" and f"-{worker.proc.pid}-" in job["consumer"]


async def submit_all(url: str, requests: list[tuple[bytes, dict]], clients: int) -> list[str]:
    """``clients`` concurrent clients POST /v1/jobs, each request with its Idempotency-Key."""
    ids = [""] * len(requests)

    async def client(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for i in range(k, len(requests), clients):
                data, params = requests[i]
                headers = {"content-type": "image/png", "Idempotency-Key": f"request-{i}"}
                response = await http.post("/v1/jobs", content=data, headers=headers, params=params)
                assert response.status_code == 202, response.text
                ids[i] = response.json()["id"]

    await asyncio.gather(*(client(k) for k in range(clients)))
    return ids


def fetch(url: str, ids: list[str]) -> list[tuple[dict, bytes]]:
    """Each job's status and result, as a client gets them."""
    with httpx.Client(base_url=url, timeout=60) as http:
        out = []
        for job_id in ids:
            result = http.get(f"/v1/jobs/{job_id}/result")
            assert result.status_code == 200, result.text
            out.append((http.get(f"/v1/jobs/{job_id}").json(), result.content))
        return out


def test_two_hundred_mixed_jobs_survive_a_killed_worker_and_a_redis_crash(
        micro_registry: Path, workers: list[Worker], tmp_path: Path) -> None:
    """200 jobs of 32² to 256² through the API, two workers; one worker is SIGKILLed mid-run, then
    Redis (append-only file, as in production) is SIGKILLed and restarted: 200 succeed with the
    right size, none is lost, none is completed twice, and only the jobs in hand at a crash needed
    a second attempt."""
    redis_server = RedisServer(tmp_path / "redis", appendonly=True)
    redis_server.workdir.mkdir()
    redis_server.start()
    sizes = [256, 128] + [32, 32, 32, 48] * 49 + [64, 64]
    requests = [(png(size, seed=i), {"seed": 1000 + i, "format": "jpeg"}) for i, size in enumerate(sizes)]
    for name in ("w1", "w2"):
        workers.append(micro_worker(micro_registry, redis_server.url, tmp_path / f"{name}.log"))
    r = Redis.from_url(redis_server.url)
    try:
        with live_server(micro_settings(micro_registry, redis_server.url, consume_jobs=False), torch_threads=1) as url:
            for worker in workers:
                worker.wait_ready()
            started = time.monotonic()
            ids = asyncio.run(submit_all(url, requests, clients=16))
            assert len(set(ids)) == len(sizes)

            # Kill a worker while it runs jobs, after a share of the work is done.
            def busy() -> list[Worker]:
                states = jobs(r, ids)
                return [w for w in workers if any(runs_on(w, job) for job in states)]

            wait_for(lambda: count(r, ids, "succeeded") >= 20 and bool(busy()), what="20 jobs done, a worker busy",
                     watch=tuple(workers))
            victim = busy()[0]
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            killed = {job_id for job_id, job in zip(ids, jobs(r, ids)) if runs_on(victim, job)}
            assert killed
            survivor = next(w for w in workers if w is not victim)

            # Then crash Redis while the survivor works: what it acknowledged comes back from the AOF.
            wait_for(lambda: count(r, ids, "succeeded") >= 60, what="60 jobs done", watch=(survivor,))
            redis_server.crash_and_restart()
            wait_for(lambda: count(r, ids, "succeeded") == len(ids), what="all jobs succeeded", watch=(survivor,))
            elapsed = time.monotonic() - started
            results = fetch(url, ids)
        final = jobs(r, ids)
        for size, job_id, (status, data) in zip(sizes, ids, results):
            assert status["state"] == "succeeded", status
            assert status["attempts"] <= 2, status
            assert status["wait_s"] >= 0 and status["compute_s"] > 0
            with Image.open(io.BytesIO(data)) as image:
                assert image.size == (4 * size, 4 * size)
        retried = {job_id for job_id, status in zip(ids, (s for s, _ in results)) if status["attempts"] == 2}
        in_hand = Settings().job_concurrency  # at most the survivor's jobs in hand when Redis crashed
        assert len(retried - killed) <= in_hand, (retried - killed, killed)
        assert r.xpending(STREAM, GROUP)["pending"] == 0 and r.xlen(DEAD_STREAM) == 0
        # Completed once: the victim's own completions plus the survivor's make 200, not more.
        by_victim = sum(f"-{victim.proc.pid}-" in job["consumer"] for job in final)
        assert by_victim + survivor.metric("vpdsr_jobs_total", outcome="succeeded") <= len(ids)
        assert survivor.metric("vpdsr_job_reclaims_total") >= len(killed)
        print(f"{len(ids)} jobs ({sum(s * s for s in sizes) / 1e6:.2f} Mpx) through 2 workers, one killed "
              f"({len(killed)} jobs reclaimed), Redis crashed once, in {elapsed:.1f} s")
    finally:
        r.close()
        redis_server.stop()


def test_twenty_concurrent_jobs_survive_a_killed_worker(micro_registry: Path, redis_server: RedisServer,
                                                        workers: list[Worker], tmp_path: Path) -> None:
    """Issue 15: 20 concurrent POST /v1/jobs of one 128² PNG (25 tiles: more than the background
    half of max_queue 32) to one API and one worker, which is SIGKILLed after a second; another
    worker is started. Used to end 19/20 failed (queue_full); now 20/20 succeed, each exactly once."""
    first = micro_worker(micro_registry, redis_server.url, tmp_path / "first.log", max_queue=32)
    workers.append(first)
    r = Redis.from_url(redis_server.url)
    with live_server(micro_settings(micro_registry, redis_server.url, consume_jobs=False), torch_threads=1) as url:
        first.wait_ready()
        ids = asyncio.run(submit_all(url, [(png(128, seed=7), {})] * 20, clients=20))
        wait_for(lambda: count(r, ids, "running") > 0, what="a job running", watch=(first,))
        time.sleep(1.0)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        done_before = count(r, ids, "succeeded")

        second = micro_worker(micro_registry, redis_server.url, tmp_path / "second.log", max_queue=32)
        workers.append(second)
        second.wait_ready()
        wait_for(lambda: count(r, ids, "succeeded") == 20, what="20 jobs succeeded", watch=(second,))
        results = fetch(url, ids)
    assert len(set(ids)) == 20 and all(status["state"] == "succeeded" for status, _ in results)
    assert all(status["attempts"] <= 2 for status, _ in results)
    for _, data in results:
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (512, 512)
    # Each job completed once: the survivor stored every result the dead worker had not.
    assert second.metric("vpdsr_jobs_total", outcome="succeeded") == 20 - done_before
    assert r.xlen(STREAM) == 20, "no job queued twice"
    assert r.xpending(STREAM, GROUP)["pending"] == 0 and r.xlen(DEAD_STREAM) == 0
    r.close()


def test_job_larger_than_the_whole_queue_completes(micro_registry: Path, redis_server: RedisServer) -> None:
    """121 tiles through an API whose whole batch queue holds 8 and whose synchronous requests may
    take 0.2 s: the job's tiles enter in chunks, without a deadline, in one attempt."""
    settings = micro_settings(micro_registry, redis_server.url, max_queue=8, request_timeout_s=0.2)
    with live_server(settings, torch_threads=1) as url, httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/v1/jobs", content=png(256, seed=1),
                             headers={"content-type": "image/png", "Idempotency-Key": "large-1"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] not in ("queued", "running"),
                 what="the job finished")
        [(status, data)] = fetch(url, [job_id])
    assert (status["state"], status["attempts"]) == ("succeeded", 1), status
    assert status["compute_s"] > settings.request_timeout_s
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (1024, 1024)
