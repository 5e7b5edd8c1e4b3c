"""The service's fast path (issue 16): ``auto`` dtype and channels-last, ``VPDSR_COMPILE``, a warm-up
that compiles every shape the batcher can form, and ``/readyz`` 503 until it is done.

The GPU speed itself is measured by benchmarks/device_suite.sh; here the CPU checks the wiring,
and that a compiled model compiles once per tile size for one tile and once for any batch.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import ValidationError
from torch._dynamo.utils import counters

from model import SRPipeline, device
from model.device import resolve_channels_last, resolve_dtype
from model.errors import InvalidRequest
from service.app import create_app
from service.engine import load_pipeline
from service.server import Server
from service.settings import Settings
from tests.conftest import free_port
from tests.live import wait_ready

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("bf16_units", [True, False])
def test_auto_dtype_follows_the_device_and_the_cpus_bf16_units(monkeypatch: pytest.MonkeyPatch, bf16_units: bool) -> None:
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: bf16_units)
    assert resolve_dtype("auto", CUDA) is torch.bfloat16
    assert resolve_dtype("auto", CPU) is (torch.bfloat16 if bf16_units else torch.float32)
    assert resolve_dtype("float32", CPU) is torch.float32 and resolve_dtype("float16", CUDA) is torch.float16


def test_channels_last_is_on_unless_switched_off() -> None:
    assert resolve_channels_last("auto") and resolve_channels_last("true") and not resolve_channels_last("false")
    with pytest.raises(InvalidRequest):
        resolve_channels_last("yes")


def test_settings_read_the_fast_path_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VPDSR_DTYPE", "VPDSR_COMPILE", "VPDSR_CHANNELS_LAST"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings()
    assert (defaults.dtype, defaults.compile, defaults.channels_last) == ("auto", "off", "auto")
    monkeypatch.setenv("VPDSR_COMPILE", "max-autotune")
    monkeypatch.setenv("VPDSR_CHANNELS_LAST", "false")
    assert (Settings().compile, Settings().channels_last) == ("max-autotune", "false")
    monkeypatch.setenv("VPDSR_COMPILE", "fast")
    with pytest.raises(ValidationError):
        Settings()


def test_load_pipeline_takes_the_settings_path(tiny_registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: True)
    auto = load_pipeline(Settings(registry=tiny_registry, model="tiny", device="cpu"))
    assert auto.dtype is torch.bfloat16 and auto.autocast and not auto.compiled
    assert auto.autoencoder.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        plain = load_pipeline(Settings(
            registry=tiny_registry, model="tiny", device="cpu", dtype="float32", channels_last="false", threads=1,
        ))
        assert plain.threads == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert plain.dtype is torch.float32 and not plain.autocast
    assert not plain.autoencoder.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fast = load_pipeline(Settings(registry=tiny_registry, model="tiny", device="cpu", compile="reduce-overhead"))
    assert fast.compiled  # compiles at its first run, i.e. in warm-up


def test_compiled_warmup_compiles_two_graphs_per_tile_size(tiny_registry: Path) -> None:
    """One graph for single tiles and one with a symbolic batch for all the others: start-up grows
    with the tile buckets, not with the batch sizes. (Backend ``eager``: dynamo's tracing only.)"""
    torch._dynamo.reset()
    counters.clear()
    pipe = SRPipeline.from_registry("tiny", tiny_registry, tile_sizes=[16], compile_mode="default", compile_backend="eager")
    pipe.warmup([1, 2, 4])
    assert counters["stats"]["unique_graphs"] == 2
    pipe.run_tiles(torch.zeros(3, 3, 16, 16), torch.zeros(3, 3, 16, 16))
    assert counters["stats"]["unique_graphs"] == 2, "a batch size the warm-up did not run compiles nothing new"
    torch._dynamo.reset()


@pytest.fixture
def gated_warmup(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """SRPipeline.warmup waits for the returned event, so a test sees the server while it warms up."""
    gate = threading.Event()
    warmup = SRPipeline.warmup

    def gated(self: SRPipeline, *args: object, **kwargs: object) -> dict[int, float]:
        gate.wait(timeout=60)
        return warmup(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SRPipeline, "warmup", gated)
    yield gate
    gate.set()


def test_readyz_is_503_until_the_warm_up_is_done(
    tiny_registry: Path, gated_warmup: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vpdsr.service")
    settings = Settings(registry=tiny_registry, model="tiny", device="cpu", dtype="float32", port=free_port())
    server = Server(create_app(settings), settings, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{settings.host}:{settings.port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                warming = httpx.get(f"{url}/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.05)
        assert warming.status_code == 503
        assert warming.json() == {"status": "not_ready", "checks": {"model": {"ok": False, "state": "loading"}}}
        gated_warmup.set()
        wait_ready(url, thread.is_alive, timeout=60)
        assert httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        assert re.search(r"warmed tiles .* in \d+\.\d s", caplog.text), "the warm-up's duration is logged"
        assert "'channels_last': True" in caplog.text and "'threads': " in caplog.text, "and the path it runs"
        loaded = httpx.get(f"{url}/v1/models", timeout=5).json()["loaded"]
        assert {key: loaded[key] for key in ("dtype", "autocast", "channels_last", "compile")} == {
            "dtype": "float32", "autocast": False, "channels_last": True, "compile": None,
        }
        assert loaded["threads"] >= 1 and set(loaded["tile_seconds"]) == {"16", "32"}
    finally:
        gated_warmup.set()
        server.should_exit = True
        thread.join(timeout=30)
