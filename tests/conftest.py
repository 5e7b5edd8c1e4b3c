"""Shared fixtures: a tiny model registry and a private Redis server.

Tests never touch the machine's own Redis (port 6379) or ../shared: Redis is started on a free
port per test session from Debian's ``redis-server`` binary, and models are made here.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model import device
from model.config import AutoencoderConfig, DDConfig, ModelConfig, UNetConfig

FIXTURES = Path(__file__).parent / "fixtures"

TINY_UNET = UNetConfig(
    image_size=16,
    model_channels=32,
    attention_resolutions=(16, 8),
    channel_mult=(1, 2),
    num_res_blocks=(1, 1),
    num_head_channels=16,
    swin_embed_dim=32,
    window_size=4,
    lq_size=16,
)
TINY_AUTOENCODER = AutoencoderConfig(
    embed_dim=3, n_embed=64, ddconfig=DDConfig(resolution=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)
)


@pytest.fixture(scope="session", autouse=True)
def float32_auto_on_every_cpu() -> Iterator[None]:
    """``auto`` resolves to float32 on the CPU in every test, whether or not the test machine has bf16
    units, so that tolerances and reproducibility checks do not depend on the host; the tests of the
    CPU fast path (tests/test_cpu_path.py, test_fast_path.py) mock the probe themselves. Servers
    started as subprocesses use the real probe."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(device, "cpu_bf16_units", lambda: False)
        yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny networks on shared cores run several times faster on one thread than on two
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module that wants it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(kind: str = "student", inference_steps: int = 1) -> ModelConfig:
    """A model small enough to run a 64² image in well under a second on one CPU core."""
    return ModelConfig(unet=TINY_UNET, autoencoder=TINY_AUTOENCODER, inference_steps=inference_steps, kind=kind)


def save_tiny_model(root: Path, name: str = "tiny", version: str = "1", seed: int = 0,
                    config: ModelConfig | None = None, **config_kw: object):
    """Write a seeded random tiny model (or one of ``config``) into a registry at ``root`` (alias
    ``production``)."""
    from model import Registry, SwinUNet, VQAutoencoder

    torch.manual_seed(seed)
    cfg = config or tiny_config(**config_kw)  # type: ignore[arg-type]
    unet, vq = SwinUNet.from_config(cfg.unet), VQAutoencoder.from_config(cfg.autoencoder)
    return Registry(root).save(name, version, cfg, unet.state_dict(), vq.state_dict(), aliases=("production",))


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    """An HTTP client for the module's live server (each service test module defines ``url``)."""
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry folder holding ``tiny:1`` (student, alias production) and ``tiny-teacher:1``."""
    root = tmp_path_factory.mktemp("registry")
    save_tiny_model(root)
    save_tiny_model(root, name="tiny-teacher", kind="teacher", inference_steps=15)
    return root


def random_png(size: int = 16, seed: int = 0) -> bytes:
    """A seeded random RGB PNG: a tiny valid upload."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` process that tests can stop and restart on the same port. With
    ``appendonly`` it persists as production does (docker/compose.yaml), fsyncing every write, so
    that a SIGKILLed server comes back with everything it acknowledged."""

    def __init__(self, workdir: Path, appendonly: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found: install Debian's redis-server package (see README)")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def crash_and_restart(self) -> None:
        """SIGKILL (no shutdown save), then start again on the same port and folder."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
