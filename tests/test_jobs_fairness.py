"""Issue 30's job repros over real HTTP and a private Redis: a giant job neither starves the jobs
behind it nor survives its client's DELETE, and a job's cost is bounded at submission.

The API consumes jobs itself (micro model, one torch thread); assertions wait for conditions,
never for timings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from jobqueue.keys import GROUP, STREAM
from tests.conftest import RedisServer, save_tiny_model
from tests.conftest import random_png as png
from tests.live import live_server
from tests.test_jobs_workers import MICRO, micro_settings, wait_for

pytestmark = pytest.mark.timeout(240)

GIANT = 512  # micro: about 470 tiles, many times the small jobs' few


@pytest.fixture(scope="module")
def micro_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("micro")
    save_tiny_model(root, name="micro", config=MICRO)
    return root


@pytest.fixture
def api(micro_registry: Path, redis_server: RedisServer) -> Iterator[httpx.Client]:
    settings = micro_settings(micro_registry, redis_server.url, max_queue=32, job_concurrency=8,
                              job_max_tiles=1000, job_block_ms=100, job_reclaim_interval_s=0.2)
    with live_server(settings, torch_threads=1) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def submit(api: httpx.Client, data: bytes, key: str) -> httpx.Response:
    return api.post("/v1/jobs", content=data, headers={"content-type": "image/png", "Idempotency-Key": key})


def state(api: httpx.Client, job_id: str) -> dict:
    return api.get(f"/v1/jobs/{job_id}").json()


def started(api: httpx.Client, job_id: str) -> bool:
    """Running with its first batch done (progress is null until then, as documented)."""
    job = state(api, job_id)
    assert job["state"] in ("queued", "running"), job
    return job["state"] == "running" and job["progress"] is not None


def test_small_jobs_behind_a_giant_one_finish_first(api: httpx.Client) -> None:
    """Red team: behind one 4096² job, 3 of 6 small jobs stayed queued for minutes (the giant's
    tiles filled the background queue). Now they run beside it and finish long before it."""
    giant = submit(api, png(GIANT, seed=1), "giant").json()["id"]
    wait_for(lambda: started(api, giant), what="the giant job computing")
    small = [submit(api, png(32, seed=10 + i), f"small-{i}").json()["id"] for i in range(6)]
    wait_for(lambda: all(state(api, j)["state"] == "succeeded" for j in small), timeout=120, what="small jobs done")
    job = state(api, giant)
    assert job["state"] == "running" and job["progress"]["done"] < job["progress"]["total"], job


def test_delete_stops_a_running_job(api: httpx.Client, redis_server: RedisServer) -> None:
    """Red team: DELETE of a running giant job answered 409 and it went on for hours."""
    giant = submit(api, png(GIANT, seed=2), "doomed").json()["id"]
    wait_for(lambda: started(api, giant), what="the giant job computing")
    cancelled = api.delete(f"/v1/jobs/{giant}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
    r = Redis.from_url(redis_server.url)
    try:  # its consumer let go of it: the entry is acknowledged, its remaining tiles dropped
        wait_for(lambda: r.xpending(STREAM, GROUP)["pending"] == 0, timeout=60, what="the job let go")
    finally:
        r.close()
    after = submit(api, png(32, seed=3), "after").json()["id"]
    wait_for(lambda: state(api, after)["state"] == "succeeded", timeout=60, what="the next job done")
    assert state(api, giant)["state"] == "cancelled" and api.get(f"/v1/jobs/{giant}/result").status_code == 409


def test_a_job_over_the_tile_limit_is_refused_at_submission(api: httpx.Client) -> None:
    refused = submit(api, png(1024, seed=4), "too-big")
    assert refused.status_code == 413, refused.text
    error = refused.json()["error"]
    assert error["code"] == "too_large_for_job" and "VPDSR_JOB_MAX_TILES" in error["message"]
