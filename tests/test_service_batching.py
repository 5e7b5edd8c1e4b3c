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
from service.engine import Engine, UpscaleOptions
from service.errors import ComputeFailed, ComputeTimeout, QueueFull, QueueTimeout
from service.metrics import Metrics
from service.settings import Settings
from service.testing import live_server, scrape
from tests.conftest import free_port


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
    batcher.add(a, 3)
    assert batcher.pop(now=0.005) is None  # 3 < 4 and younger than the delay
    assert batcher.wait_time(now=0.005) == pytest.approx(0.005)
    batcher.add(b, 2)
    batch = batcher.pop(now=0.005)  # 5 ≥ 4: a full batch, oldest first, mixing requests
    assert batch is not None and batch.entries == [(a, 0), (a, 1), (a, 2), (b, 0)]
    assert batcher.depth == 1 and batcher.pop(now=0.005) is None
    assert batcher.pop(now=0.012) == type(batch)((16, 1), [(b, 1)])
    assert batcher.depth == 0 and batcher.wait_time(now=1) is None


def test_batches_only_come_in_warmed_sizes() -> None:
    batcher: Batcher[Req] = Batcher([1, 2, 4, 8], max_delay=0)
    batcher.add(Req(), 7)
    assert [len(batcher.pop(now=0).entries) for _ in range(3)] == [4, 2, 1]  # type: ignore[union-attr]


def test_only_equal_keys_share_a_batch() -> None:
    batcher: Batcher[Req] = Batcher([1, 2, 4], max_delay=0)
    small, large, more_steps = Req((16, 1)), Req((32, 1)), Req((16, 4))
    for request in (small, large, more_steps):
        batcher.add(request, 1)
    keys = [batcher.pop(now=1).key for _ in range(3)]  # type: ignore[union-attr]
    assert sorted(keys) == [(16, 1), (16, 4), (32, 1)]


def test_interactive_before_background_and_background_fills_up() -> None:
    batcher: Batcher[Req] = Batcher([1, 2, 4], max_delay=0)
    background = Req((16, 1), Priority.BACKGROUND, enqueued_at=0.0)
    other_key = Req((32, 1), Priority.BACKGROUND, enqueued_at=0.0)
    interactive = Req((16, 1), Priority.INTERACTIVE, enqueued_at=0.5)
    batcher.add(background, 3)
    batcher.add(other_key, 1)
    batcher.add(interactive, 1)
    first = batcher.pop(now=1)
    assert first is not None and first.entries == [(interactive, 0), (background, 0), (background, 1), (background, 2)]
    second = batcher.pop(now=1)
    assert second is not None and second.entries == [(other_key, 0)]


def test_discard_drops_only_that_requests_waiting_tiles() -> None:
    batcher: Batcher[Req] = Batcher([1, 2, 4], max_delay=0)
    keep, drop = Req(), Req()
    batcher.add(keep, 1)
    batcher.add(drop, 2)
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


async def started_engine(registry: Path, pipe: Instrumented, **overrides: object) -> Engine:
    engine = Engine(settings_for(registry, **overrides), Metrics(), load=lambda: pipe)  # type: ignore[arg-type,return-value]
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
        with pytest.raises(QueueTimeout) as caught:
            await engine.upscale(image(), deadline=time.monotonic() + 0.2)
        assert caught.value.status == 503 and caught.value.retry_after >= 1
        assert engine._batcher.depth == 0 and pipe.batches == []
    finally:
        await engine.stop()


async def test_compute_timeout_is_504(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    pipe = Instrumented(tiny_pipe, delay=1.0)
    engine = await started_engine(tiny_registry, pipe, max_batch_size=1, max_delay_ms=0)
    try:
        with pytest.raises(ComputeTimeout) as caught:
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


async def test_bounded_queue_and_background_share(tiny_registry: Path, tiny_pipe: SRPipeline) -> None:
    pipe = Instrumented(tiny_pipe)
    engine = await started_engine(tiny_registry, pipe, max_batch_size=2, max_delay_ms=60_000, max_queue=2)
    try:
        first = asyncio.create_task(engine.upscale(image()))  # 1 tile, waits for a second one
        await until(lambda: engine._batcher.depth == 1)
        with pytest.raises(QueueFull) as caught:  # background work may fill only half the queue
            await engine.upscale(image(), UpscaleOptions(seed=1), priority=Priority.BACKGROUND)
        assert caught.value.status == 429 and caught.value.retry_after >= 1
        results = await asyncio.gather(first, engine.upscale(image()))  # interactive: admitted, fills the batch
        assert [r.image.size for r in results] == [(64, 64)] * 2 and pipe.batches == [2]
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
    assert set(statuses) == {200, 429} and statuses.count(200) >= 3, statuses
    refused = next(r for r in upscales if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    async with httpx.AsyncClient(base_url=overloaded_url, timeout=60) as client:  # and it recovers
        again = await client.post("/v1/upscale", content=noise_png(16, 16), headers={"content-type": "image/png"})
    assert again.status_code == 200
