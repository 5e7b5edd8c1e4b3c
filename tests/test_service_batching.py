"""Dynamic batching, back-pressure, deadlines, cancellation and failure isolation."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from torch import Tensor

from model import SRPipeline
from service.batcher import Batcher, Priority, warm_batch_sizes
from service.engine import InferenceEngine
from service.failures import ComputeFailed, ComputeTimeout, QueueTimeout, TileQueueFull, TooLargeForSync
from service.prometheus import Metrics
from service.schemas import UpscaleOptions
from service.settings import Settings
from tests.answers import answered
from tests.conftest import free_port
from tests.live import live_server, scrape


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def settings_for(registry: Path, **overrides: object) -> Settings:
    return Settings(registry=registry, model="tiny@production", device="cpu", port=free_port(), **overrides)


# -- the batcher on its own ------------------------------------------------------------------------
@dataclass(eq=False)
class Req:
    key: tuple[int, int] = (16, 1)
    priority: Priority = Priority.INTERACTIVE
    enqueued_at: float = 0.0


def test_warm_batch_sizes_are_powers_of_two_and_the_maximum() -> None:
    assert warm_batch_sizes(1) == [1]
    assert warm_batch_sizes(8) == [1, 2, 4, 8]
    assert warm_batch_sizes(12) == [1, 2, 4, 8, 12]


def test_full_batch_goes_at_once_partial_batch_after_the_delay() -> None:
    batcher: Batcher[Req] = Batcher([1, 2, 4], max_delay=0.010)
    a, b = Req(enqueued_at=0.0), Req(enqueued_at=0.001)
    batcher.add(a, range(3))
    assert batcher.pop(now=0.005) is None  # 3 < 4 and younger than the delay
    assert batcher.wait_time(now=0.005) == pytest.approx(0.005)
    batcher.add(b, range(2))
    batch = batcher.pop(now=0.005)  # 5 ≥ 4: a full batch, oldest first, mixing requests
    assert batch is not None and batch.entries == [(a, 0), (a, 1), (a, 2), (b, 0)]
    assert batcher.depth == 1 and batcher.pop(now=0.005) is None
    assert batcher.pop(now=0.012) == type(batch)((16, 1), [(b, 1)])
    assert batcher.depth == 0 and batcher.wait_time(now=1) is None


def test_batches_only_come_in_warmed_sizes() -> None:
    batcher: Batcher[Req] = Batcher([1, 2, 4, 8], max_delay=0)
    batcher.add(Req(), range(7))
    assert [len(batcher.pop(now=0).entries) for _ in range(3)] == [4, 2, 1]  # type: ignore[union-attr]


def test_only_equal_keys_share_a_batch() -> None:
    batcher: Batcher[Req] = Batcher([1, 2, 4], max_delay=0)
    small, large, more_steps = Req((16, 1)), Req((32, 1)), Req((16, 4))
    for request in (small, large, more_steps):
        batcher.add(request, range(1))
    keys = [batcher.pop(now=1).key for _ in range(3)]  # type: ignore[union-attr]
    assert sorted(keys) == [(16, 1), (16, 4), (32, 1)]


def test_interactive_before_background_and_background_fills_up() -> None:
    batcher: Batcher[Req] = Batcher([1, 2, 4], max_delay=0)
    background = Req((16, 1), Priority.BACKGROUND, enqueued_at=0.0)
    other_key = Req((32, 1), Priority.BACKGROUND, enqueued_at=0.0)
    interactive = Req((16, 1), Priority.INTERACTIVE, enqueued_at=0.5)
    batcher.add(background, range(3))
    batcher.add(other_key, range(1))
    batcher.add(interactive, range(1))
    first = batcher.pop(now=1)
    assert first is not None and first.entries == [(interactive, 0), (background, 0), (background, 1), (background, 2)]
    second = batcher.pop(now=1)
    assert second is not None and second.entries == [(other_key, 0)]


def test_discard_drops_only_that_requests_waiting_tiles() -> None:
    batcher: Batcher[Req] = Batcher([1, 2, 4], max_delay=0)
    keep, drop = Req(), Req()
    batcher.add(keep, range(1))
    batcher.add(drop, range(2))
    assert batcher.discard(drop) == 2 and batcher.depth == 1
    assert batcher.pop(now=1).entries == [(keep, 0)]  # type: ignore[union-attr]


# -- the engine on a real (tiny) model, without HTTP -----------------------------------------------
class Instrumented:
    """The real pipeline, recording batch sizes; fails batches holding an all-black tile, and can
    be slowed down."""

    def __init__(self, pipe: SRPipeline, delay: float = 0.0) -> None:
        self.pipe = pipe
        self.delay = delay
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.pipe, name)

    def run_tiles(self, lr: Tensor, noise: Tensor, steps: int | None = None) -> Tensor:
        self.batches.append(len(lr))
        time.sleep(self.delay)
        if (lr.flatten(1).amax(dim=1) <= -1).any():
            raise RuntimeError("poisoned tile")
        return self.pipe.run_tiles(lr, noise, steps)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_registry: Path) -> SRPipeline:
    return SRPipeline.from_registry("tiny@production", tiny_registry, tile_sizes=(16,))


async def started_engine(registry: Path, pipe: Instrumented, **overrides: object) -> InferenceEngine:
    engine = InferenceEngine(settings_for(registry, **overrides), Metrics(), load=lambda: pipe)  # type: ignore[arg-type,return-value]
    await engine.start()
    return engine


def image(colour: str | None = None, width: int = 16, height: int = 16) -> Image.Image:
    if colour is not None:
        return Image.new("RGB", (width, height), colour)
    return Image.open(io.BytesIO(noise_png(width, height)))


async def test_a_failing_batch_fails_only_the_culprit(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    pipe = Instrumented(tiny_pipe)
    engine = await started_engine(tiny_registry, pipe, max_batch_size=2, max_delay_ms=5000)
    try:
        good, bad = await asyncio.gather(
            engine.upscale(image()), engine.upscale(image("black")), return_exceptions=True
        )
    finally:
        await engine.stop()
    assert pipe.batches == [2, 1, 1]  # shared batch failed, then each request alone
    assert isinstance(bad, ComputeFailed)
    assert not isinstance(good, BaseException) and good.image.size == (64, 64)


async def test_queue_timeout_is_503_and_drops_the_tiles(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    pipe = Instrumented(tiny_pipe)
    engine = await started_engine(tiny_registry, pipe, max_batch_size=2, max_delay_ms=60_000)
    try:
        with answered(QueueTimeout) as caught:
            await engine.upscale(image(), deadline=time.monotonic() + 0.2)
        assert caught.value.status == 503 and caught.value.retry_after >= 1
        assert engine._batcher.depth == 0 and pipe.batches == []
    finally:
        await engine.stop()


async def test_compute_timeout_is_504(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    pipe = Instrumented(tiny_pipe, delay=1.0)
    engine = await started_engine(tiny_registry, pipe, max_batch_size=1, max_delay_ms=0)
    try:
        with answered(ComputeTimeout) as caught:
            await engine.upscale(image(), deadline=time.monotonic() + 0.3)
        assert caught.value.status == 504
    finally:
        await engine.stop()


async def test_cancelled_request_costs_no_compute(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    pipe = Instrumented(tiny_pipe)
    engine = await started_engine(tiny_registry, pipe, max_batch_size=2, max_delay_ms=60_000)
    try:
        task = asyncio.create_task(engine.upscale(image()))
        await until(lambda: engine._batcher.depth == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert engine._batcher.depth == 0 and pipe.batches == []
    finally:
        await engine.stop()


async def test_background_work_larger_than_the_queue_enters_in_chunks(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    """A job never gets TileQueueFull: its 25 tiles enter the background half of a 4-tile queue two at a
    time, and an interactive request sent meanwhile still goes first."""
    pipe = Instrumented(tiny_pipe, delay=0.02)
    engine = await started_engine(tiny_registry, pipe, max_batch_size=2, max_delay_ms=0, max_queue=4)
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, engine._batcher.waiting[Priority.BACKGROUND])
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        job = asyncio.create_task(engine.upscale(image(width=64, height=64), priority=Priority.BACKGROUND))
        await until(lambda: len(pipe.batches) >= 2)
        interactive = await engine.upscale(image())
        assert not job.done()  # the interactive tile jumped the job's remaining tiles
        result = await job
    finally:
        watcher.cancel()
        await engine.stop()
    assert result.image.size == (256, 256) and interactive.image.size == (64, 64)
    assert sum(pipe.batches) == 25 + 1 and most <= 2


async def test_background_ready_waits_for_room(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    pipe = Instrumented(tiny_pipe, delay=0.05)
    engine = await started_engine(tiny_registry, pipe, max_batch_size=1, max_delay_ms=0, max_queue=2)
    try:
        await asyncio.wait_for(engine.background_ready(), 1)  # idle: room at once
        job = asyncio.create_task(engine.upscale(image(width=64, height=64), priority=Priority.BACKGROUND))
        await until(lambda: engine._batcher.waiting[Priority.BACKGROUND] == 1)
        ready = asyncio.create_task(engine.background_ready())
        await asyncio.sleep(0.01)
        assert not ready.done() or engine._batcher.waiting[Priority.BACKGROUND] == 0
        await job
        await asyncio.wait_for(ready, 1)
    finally:
        await engine.stop()


async def test_sync_admission_by_estimated_cost(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    """413 at once when even an idle server could not finish in time; 429 with a bounded Retry-After
    when the interactive queue ahead is too long; both before any tile is planned or computed."""
    pipe = Instrumented(tiny_pipe, delay=0.2)
    engine = await started_engine(tiny_registry, pipe, max_batch_size=1, max_delay_ms=0, request_timeout_s=1.0,
                                  redis_url="redis://127.0.0.1:1/0")
    try:
        engine._costs.warmed({tile: 0.2 for tile in tiny_pipe.tile_sizes}, tiny_pipe.config.inference_steps)
        assert engine.estimate(64, 64) == (25, pytest.approx(5.0, rel=1e-3))  # decays a little meanwhile
        started = time.monotonic()
        with answered(TooLargeForSync) as too_large:
            await engine.upscale(image(width=64, height=64))
        assert time.monotonic() - started < 0.5 and pipe.batches == []
        assert too_large.value.status == 413 and "/v1/jobs" in too_large.value.message
        assert "25 tiles, an estimated 5.0 s" in too_large.value.message, "the estimate it refused on"
        ahead = [asyncio.create_task(engine.upscale(image(), UpscaleOptions(seed=i))) for i in range(4)]
        await until(lambda: len(pipe.batches) == 1)
        with answered(TileQueueFull) as busy:
            await engine.upscale(image(width=24, height=24))  # 4 tiles = 0.8 s behind 0.6 s of queue
        assert busy.value.status == 429 and 1 <= busy.value.retry_after <= 1.0 + 1
        assert all(r.image.size == (64, 64) for r in await asyncio.gather(*ahead))
    finally:
        await engine.stop()


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- over HTTP -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batching_url(tiny_registry: Path) -> Iterator[str]:
    with live_server(settings_for(tiny_registry, max_batch_size=4, max_delay_ms=3000), torch_threads=1) as url:
        yield url


async def test_concurrent_requests_share_a_batch(batching_url: str) -> None:
    before = scrape(batching_url)
    async with httpx.AsyncClient(base_url=batching_url, timeout=60) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/upscale", content=noise_png(16, 16, seed), headers={"content-type": "image/png"})
            for seed in range(4)
        ))
    assert [r.status_code for r in responses] == [200] * 4
    after = scrape(batching_url)
    batches = after[("vpdsr_batch_size_count", frozenset())] - before.get(("vpdsr_batch_size_count", frozenset()), 0)
    tiles = after[("vpdsr_tiles_total", frozenset())] - before.get(("vpdsr_tiles_total", frozenset()), 0)
    assert tiles == 4 and batches < 4  # at least one batch held tiles of several requests


async def test_disconnected_client_costs_no_compute(batching_url: str) -> None:
    def depth() -> float:
        return scrape(batching_url)[("vpdsr_queue_depth", frozenset())]

    tiles_before = scrape(batching_url)[("vpdsr_tiles_total", frozenset())]
    async with httpx.AsyncClient(base_url=batching_url, timeout=60) as client:
        request = asyncio.create_task(
            client.post("/v1/upscale", content=noise_png(16, 16), headers={"content-type": "image/png"})
        )
        await until(lambda: depth() == 1)  # the tile waits for company (3 s batching delay)
        request.cancel()  # closes the connection
        await asyncio.gather(request, return_exceptions=True)
    await until(lambda: depth() == 0, timeout=2)  # dropped well before the delay would have run it
    assert scrape(batching_url)[("vpdsr_tiles_total", frozenset())] == tiles_before


@pytest.fixture(scope="module")
def overloaded_url(tiny_registry: Path) -> Iterator[str]:
    settings = settings_for(tiny_registry, max_batch_size=1, max_delay_ms=0, max_queue=2)
    with live_server(settings, torch_threads=1) as url:
        yield url


async def test_overload_gets_429_while_health_and_metrics_answer(overloaded_url: str) -> None:
    async with httpx.AsyncClient(base_url=overloaded_url, timeout=60) as client:
        burst = [
            client.post("/v1/upscale", content=noise_png(32, 32, seed), headers={"content-type": "image/png"})
            for seed in range(12)
        ]
        probes = [client.get(path, timeout=10) for path in ("/healthz", "/metrics") * 3]
        answers = await asyncio.gather(*burst, *probes)
    upscales, side = answers[: len(burst)], answers[len(burst):]
    assert all(r.status_code == 200 for r in side)
    statuses = sorted(r.status_code for r in upscales)
    # max_queue=2: the first two are admitted (planned ones hold their place); the rest of a
    # simultaneous burst is refused unless one of the two has finished meanwhile.
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    refused = next(r for r in upscales if r.status_code == 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 60  # never beyond request_timeout_s
    assert refused.json()["error"]["code"] == "queue_full"
    async with httpx.AsyncClient(base_url=overloaded_url, timeout=60) as client:  # and it recovers
        again = await client.post("/v1/upscale", content=noise_png(16, 16), headers={"content-type": "image/png"})
    assert again.status_code == 200


async def test_huge_solid_upload_is_refused_at_once_and_locks_nobody_out(overloaded_url: str) -> None:
    """Red team: a 58 KB solid 4096² PNG was planned (1.5 s, 480 MB) into 29,241 tiles, and every other
    client then got 429 with Retry-After ≈ 12,000 s. Now: 413 from its size alone, others unaffected."""
    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4096), "grey").save(buffer, "PNG")
    async with httpx.AsyncClient(base_url=overloaded_url, timeout=60) as client:
        started = time.monotonic()
        huge = await client.post("/v1/upscale", content=buffer.getvalue(), headers={"content-type": "image/png"})
        elapsed = time.monotonic() - started
        small = await client.post("/v1/upscale", content=noise_png(16, 16), headers={"content-type": "image/png"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "too_large_for_sync", huge.text
    assert "retry-after" not in huge.headers and elapsed < 5
    assert small.status_code == 200


async def test_results_depend_on_batching_by_at_most_one_level(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    """The guarantee docs/service.md states: the same image, seed and tile size give the same result
    to within 1 level of 255 whichever requests share its batch (kernels may reassociate sums by batch
    size), and exactly the same result in the same batch composition."""
    engine = await started_engine(tiny_registry, Instrumented(tiny_pipe), max_batch_size=8, max_delay_ms=200)
    inputs = [image(width=24, height=24) if i % 2 else image(width=16, height=16) for i in range(8)]
    try:
        alone = [np.asarray((await engine.upscale(im, UpscaleOptions(seed=7))).image, dtype=int) for im in inputs]
        together = await asyncio.gather(*(engine.upscale(im, UpscaleOptions(seed=7)) for im in inputs))
        again = await asyncio.gather(*(engine.upscale(im, UpscaleOptions(seed=7)) for im in inputs))
    finally:
        await engine.stop()
    for single, batched, repeat in zip(alone, together, again):
        assert np.abs(single - np.asarray(batched.image, dtype=int)).max() <= 1
        assert np.array_equal(np.asarray(batched.image), np.asarray(repeat.image))


async def test_progress_rises_to_the_total(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    engine = await started_engine(tiny_registry, Instrumented(tiny_pipe), max_batch_size=4, max_delay_ms=0)
    seen: list[tuple[int, int]] = []
    try:
        await engine.upscale(image(width=64, height=64), priority=Priority.BACKGROUND,
                             progress=lambda done, total: seen.append((done, total)))
    finally:
        await engine.stop()
    assert seen[0][0] > 0, "no report before the first batch (a job's progress stays null until then)"
    assert seen[0][1] == 25 and seen[-1] == (25, 25) and len(seen) >= 7
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
