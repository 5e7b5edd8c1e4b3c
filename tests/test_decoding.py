"""Bounded decoding (issue 30): every decode runs in a process that is killed when its time budget
runs out or its request is cancelled, and what the header tells (JPEG scans, TIFF pages) is
refused or counted before any pixel is decoded."""

from __future__ import annotations

import asyncio
import io
import os
import resource
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from service.decoding import Decoder, decoder_for
from service.errors import PayloadTooLarge
from service.imageio import ImageLimits
from service.settings import Settings
from tests.conftest import free_port, random_png
from tests.live import live_server


def burn(seconds: float, pid_file: str) -> int:
    """Runs in the decoder's child: record its pid, then spin on the CPU."""
    Path(pid_file).write_text(str(os.getpid()))
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return os.getpid()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def progressive_jpeg(side: int, extra_scans: int) -> bytes:
    """A smooth progressive JPEG whose last scan is repeated ``extra_scans`` times: each repeat is
    one more start-of-scan marker, as in the red team's decode bomb."""
    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last = data.rfind(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra_scans + b"\xff\xd9"


def test_a_cancelled_decode_kills_its_process_and_the_pool_goes_on(tmp_path: Path) -> None:
    decoder = Decoder(processes=1, timeout_s=60)
    pid_file = tmp_path / "pid"

    async def scenario() -> int:
        task = asyncio.ensure_future(decoder.run(burn, 60.0, str(pid_file)))
        while not pid_file.exists():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        task.cancel()  # what the route does when its client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(pid_file.read_text())

    try:
        pid = asyncio.run(scenario())
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the child still burns CPU after its request was cancelled"
        # A new child takes the next decode.
        image = asyncio.run(decoder.decode(random_png(16, 3), ImageLimits())).image
        assert image.size == (16, 16)
    finally:
        decoder.close()


def test_a_decode_past_its_budget_is_a_413_and_costs_no_more(tmp_path: Path) -> None:
    decoder = Decoder(processes=1, timeout_s=0.5)
    try:
        asyncio.run(decoder.decode(random_png(16, 1), ImageLimits()))  # the child is up
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            asyncio.run(decoder.run(burn, 60.0, str(tmp_path / "pid")))
        assert time.monotonic() - started < 15
        pid = int((tmp_path / "pid").read_text())
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid)
        assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before < 5
    finally:
        decoder.close()


@pytest.fixture(scope="module")
def url(tiny_registry: Path) -> Iterator[str]:
    settings = Settings(registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(),
                        max_batch_size=2, max_delay_ms=5, max_jpeg_scans=40)
    with live_server(settings, torch_threads=1) as base:
        yield base


def post(url: str, data: bytes, media_type: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/upscale", content=data, headers={"content-type": media_type}, timeout=120)


def test_a_jpeg_of_too_many_scans_is_refused_from_its_markers(url: str) -> None:
    bomb = progressive_jpeg(64, extra_scans=60)
    response = post(url, bomb, "image/jpeg")
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert "scans exceeds the limit of 40" in error["message"] and "baseline" in error["message"]
    ordinary = post(url, progressive_jpeg(16, extra_scans=0), "image/jpeg")
    assert ordinary.status_code == 200, ordinary.text


def test_tiff_pages_are_counted_from_the_header_up_to_a_cap(url: str) -> None:
    pages = [Image.new("RGB", (16, 16), (i % 256, 0, 0)) for i in range(1200)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    response = post(url, buffer.getvalue(), "image/tiff")
    assert response.status_code == 200, response.text
    assert response.headers["X-Frames-Ignored"] == "999"


def test_the_decode_budget_applies_to_requests(tiny_registry: Path) -> None:
    settings = Settings(registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(),
                        max_batch_size=2, max_delay_ms=5, decode_timeout_s=0.001)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, "PNG")
    try:
        with live_server(settings, torch_threads=1) as base:
            response = post(base, buffer.getvalue(), "image/png")
    finally:
        decoder_for(settings).close()
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and "to decode" in error["message"]


def test_payload_too_large_survives_the_trip_from_the_child() -> None:
    """Errors raised in the child come back as the same class, message intact."""
    decoder = Decoder(processes=1, timeout_s=30)
    try:
        with pytest.raises(PayloadTooLarge, match="exceeds the limit of 100 pixels"):
            asyncio.run(decoder.decode(random_png(16, 1), ImageLimits(max_pixels=100)))
    finally:
        decoder.close()
