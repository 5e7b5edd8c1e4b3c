"""How large an image a synchronous ``POST /v1/upscale`` takes: what the model's measured speed
allows in ``request_timeout_s``, not a fixed tile count (issue 29: on a default server every photo
over about 190×190 px got 413 for being more than 256 tiles, and the 413 did not say what to do).

The model here computes nothing (its tiles come back black at once) and "measures" whatever speed
a test gives its warm-up, so every test asserts behaviour at a chosen speed, never the machine's.
Two tile geometries: many small tiles (as vpdsr-small:2, 16 px) and few large ones (64/128 px).
"""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from torch import Tensor

from model import SRPipeline
from service import engine as engine_module
from service.costs import largest_fitting
from service.engine import InferenceEngine
from service.failures import ComputeTimeout, TooLargeForSync
from service.prometheus import Metrics
from service.settings import Settings
from tests.answers import answered
from tests.conftest import free_port
from tests.live import live_server

SMALL_TILES = (16,)
LARGE_TILES = (64, 128)
LIMIT_S = 60.0  # the default request_timeout_s


class Model:
    """The tiny model's geometry, with black tiles computed at once and a warm-up that reports
    ``seconds_per_tile``; ``gate`` (when set) holds every batch until it is opened."""

    def __init__(self, registry: Path, tile_sizes: tuple[int, ...], seconds_per_tile: float) -> None:
        self.pipe = SRPipeline.from_registry("tiny@production", registry, tile_sizes=tile_sizes)
        self.seconds_per_tile = seconds_per_tile
        self.gate: threading.Event | None = None
        self.batches = 0
        self.pipe.run_tiles = self.run_tiles  # type: ignore[method-assign]
        self.pipe.warmup = self.warmup  # type: ignore[method-assign]

    def run_tiles(self, lr: Tensor, noise: Tensor, steps: int | None = None) -> Tensor:
        self.batches += 1
        if self.gate is not None:
            self.gate.wait()
        scale = self.pipe.scale
        return torch.zeros(lr.shape[0], 3, lr.shape[2] * scale, lr.shape[3] * scale)

    def warmup(self, batch_sizes: object, steps: int | None = None) -> dict[int, float]:
        self.pipe.tile_seconds = {tile: self.seconds_per_tile for tile in self.pipe.tile_sizes}
        return dict(self.pipe.tile_seconds)


def settings_for(registry: Path, **overrides: object) -> Settings:
    """A default server (no Redis, default limits), as `vpdsr serve` runs out of the box."""
    return Settings(registry=registry, model="tiny@production", device="cpu", port=free_port(), **overrides)


async def started(registry: Path, model: Model, **overrides: object) -> InferenceEngine:
    engine = InferenceEngine(settings_for(registry, **overrides), Metrics(), load=lambda: model.pipe)
    await engine.start()
    return engine


def photo(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), "olive")


def fitting_size(message: str) -> tuple[int, int]:
    found = re.search(r"up to about (\d+)×(\d+)", message)
    assert found, message
    return int(found[1]), int(found[2])


@pytest.mark.parametrize("tile_sizes", [SMALL_TILES, LARGE_TILES], ids=["small-tiles", "large-tiles"])
async def test_the_sync_limit_is_the_measured_speed_times_the_timeout(tiny_registry: Path, tile_sizes: tuple[int, ...]) -> None:
    """The same image: refused with what to do when the measured speed says it cannot finish in
    time, upscaled when it says it can, however many tiles that is (above the old fixed 256)."""
    width, height = 320, 240
    tiles = len(SRPipeline.from_registry("tiny@production", tiny_registry, tile_sizes=tile_sizes)
                .layout(width, height).boxes)
    if tile_sizes == SMALL_TILES:
        assert tiles > 256, "more tiles than the fixed limit this replaces"

    slow = Model(tiny_registry, tile_sizes, seconds_per_tile=2 * LIMIT_S / tiles)  # 120 s for this image
    engine = await started(tiny_registry, slow)
    try:
        assert engine.settings.max_queue is None and not engine.settings.jobs_enabled
        with answered(TooLargeForSync) as refused:
            await engine.upscale(photo(width, height))
        assert slow.batches == 0, "refused before any compute"
        message = refused.value.message
        assert refused.value.status == 413 and f"this {width}×{height} image is {tiles} tiles" in message
        assert "more than the 60 s a synchronous request may take (VPDSR_REQUEST_TIMEOUT_S)" in message
        for remedy in ("`vpdsr upscale INPUT OUTPUT`", "VPDSR_REDIS_URL", "POST /v1/jobs", "VPDSR_REQUEST_TIMEOUT_S above"):
            assert remedy in message, (remedy, message)
        # The size it names fits at this speed, and one a tenth larger per side does not.
        fit_w, fit_h = fitting_size(message)
        assert abs(fit_w / fit_h - width / height) < 0.05 and fit_w < width
        assert engine.estimate(fit_w, fit_h)[1] <= LIMIT_S
        assert engine.estimate(round(fit_w * 1.1), round(fit_h * 1.1))[1] > LIMIT_S
        fitted = await engine.upscale(photo(fit_w, fit_h))
        assert fitted.image.size == (4 * fit_w, 4 * fit_h)
    finally:
        await engine.stop()

    fast = Model(tiny_registry, tile_sizes, seconds_per_tile=LIMIT_S / tiles / 2)  # 30 s for this image
    engine = await started(tiny_registry, fast)
    try:
        result = await engine.upscale(photo(width, height))
        assert result.image.size == (4 * width, 4 * height) and fast.batches > 0
    finally:
        await engine.stop()


@pytest.mark.timeout(900)  # a 16-megapixel PNG is assembled and encoded: minutes on a loaded 2-core CPU
@pytest.mark.parametrize("seconds_per_tile", [1e-4, 10.0], ids=["fast-machine", "slow-machine"])
def test_the_readme_curl_of_a_megapixel_photo_is_never_a_dead_end(
    tiny_registry: Path, monkeypatch: pytest.MonkeyPatch, seconds_per_tile: float
) -> None:
    """The README's command on a default `vpdsr serve` (no Redis): a 1-megapixel JPEG comes back ×4
    as a PNG where the measured speed allows it; elsewhere a 413 whose JSON names the README's next
    line (`vpdsr upscale`), the job queue and the setting, and the largest size that would fit."""
    model = Model(tiny_registry, LARGE_TILES, seconds_per_tile)
    monkeypatch.setattr(engine_module, "load_pipeline", lambda settings: model.pipe)
    buffer = io.BytesIO()
    photo(1152, 864).save(buffer, "JPEG", quality=90)
    with live_server(settings_for(tiny_registry)) as url:
        answer = httpx.post(f"{url}/v1/upscale?format=png", content=buffer.getvalue(),
                            headers={"Content-Type": "image/jpeg"}, timeout=None)
    if seconds_per_tile < 1:
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(answer.content)).size == (4 * 1152, 4 * 864)
        return
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["code"] == "too_large_for_sync"
    for remedy in ("`vpdsr upscale INPUT OUTPUT`", "POST /v1/jobs", "VPDSR_REDIS_URL", "VPDSR_REQUEST_TIMEOUT_S"):
        assert remedy in error["message"], (remedy, error["message"])
    assert fitting_size(error["message"])[0] < 1152
    assert model.batches == 0


async def test_with_a_job_queue_the_413_points_to_the_job_endpoint(tiny_registry: Path) -> None:
    model = Model(tiny_registry, LARGE_TILES, seconds_per_tile=100.0)
    engine = await started(tiny_registry, model, redis_url="redis://127.0.0.1:1/0")  # never contacted
    try:
        with answered(TooLargeForSync) as refused:
            await engine.upscale(photo(640, 480))
        assert "send the same request to POST /v1/jobs" in refused.value.message
        assert "`vpdsr upscale INPUT OUTPUT`" in refused.value.message
    finally:
        await engine.stop()


async def test_an_operators_tile_cap_still_applies_and_names_its_setting(tiny_registry: Path) -> None:
    model = Model(tiny_registry, SMALL_TILES, seconds_per_tile=1e-6)
    engine = await started(tiny_registry, model, max_queue=4)
    try:
        with answered(TooLargeForSync) as refused:
            await engine.upscale(photo(100, 100))
        assert "more than the 4 tiles a synchronous request may queue (VPDSR_MAX_QUEUE)" in refused.value.message
        assert "VPDSR_MAX_QUEUE to" in refused.value.message and "`vpdsr upscale" in refused.value.message
        fit_w, fit_h = fitting_size(refused.value.message)
        assert engine.estimate(fit_w, fit_h)[0] <= 4
    finally:
        await engine.stop()


async def test_a_request_that_runs_out_of_time_says_what_to_do(tiny_registry: Path) -> None:
    """An estimate that decayed while the server was idle can admit an image that then cannot
    finish: its 504 says what to do instead, like the 413 it should have had."""
    model = Model(tiny_registry, LARGE_TILES, seconds_per_tile=1e-6)
    model.gate = threading.Event()
    engine = await started(tiny_registry, model, max_delay_ms=0)
    try:
        # The first batch starts at once (and waits at the gate); the deadline leaves a loaded machine
        # time to plan the image, or the answer would be 503 queue_timeout instead.
        request = asyncio.create_task(engine.upscale(photo(300, 300), deadline=time.monotonic() + 15))
        while model.batches == 0 and not request.done():
            await asyncio.sleep(0.01)
        with answered(ComputeTimeout) as timed_out:
            await request
        assert timed_out.value.status == 504
        assert "VPDSR_REQUEST_TIMEOUT_S" in timed_out.value.message
        assert "`vpdsr upscale INPUT OUTPUT`" in timed_out.value.message
    finally:
        model.gate.set()
        await engine.stop()


def test_largest_fitting_keeps_the_shape() -> None:
    assert largest_fitting(lambda w, h: w * h <= 10_000, 400, 100) == (200, 50)
    assert largest_fitting(lambda w, h: False, 400, 100) == (0, 0)
    assert largest_fitting(lambda w, h: True, 400, 100) == (400, 100)


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Every test of this module on one torch thread (conftest's one_thread)."""
