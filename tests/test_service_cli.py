"""Settings from the environment, API keys, and `vpdsr serve` as a real process."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from service.settings import Settings
from tests.conftest import free_port
from tests.live import live_server, wait_ready

DOCS = Path(__file__).parents[1] / "docs" / "service.md"
VPDSR = str(Path(sys.executable).with_name("vpdsr"))


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPDSR_API_KEYS", " alpha, beta,,")
    monkeypatch.setenv("VPDSR_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("VPDSR_CONSUME_JOBS", "false")
    settings = Settings()
    assert [key.get_secret_value() for key in settings.api_keys] == ["alpha", "beta"]
    assert "alpha" not in repr(settings)  # keys are secrets: never in logs
    assert (settings.max_batch_size, settings.consume_jobs) == (16, False)
    assert Settings(max_batch_size=2).max_batch_size == 2  # explicit values beat the environment


def test_settings_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VPDSR_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert (settings.model, settings.host, settings.port, settings.device) == (
        "vpdsr-small@production", "127.0.0.1", 8000, "auto"
    )
    assert (settings.max_batch_size, settings.max_delay_ms, settings.max_queue) == (8, 10, None)
    assert settings.api_keys == [] and settings.redis_url is None and settings.metrics_port == 9100
    connections = (settings.max_connections, settings.keep_alive_timeout_s, settings.shutdown_timeout_s)
    assert connections == (64, 5, 20) and (settings.body_idle_timeout_s, settings.body_timeout_s) == (20, 120)
    for bad in ({"device": "tpu"}, {"dtype": "int8"}, {"max_batch_size": 0}, {"port": 70000}, {"max_connections": 0},
                {"body_idle_timeout_s": 0}):
        with pytest.raises(ValidationError):
            Settings(**bad)


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"`VPDSR_([A-Z_]+)`", DOCS.read_text()))
    assert documented == {name.upper() for name in Settings.model_fields}


# -- API keys --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secured_url(tiny_registry: Path) -> Iterator[str]:
    settings = Settings(
        registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(), max_batch_size=1,
        api_keys="first-key,second-key",  # type: ignore[arg-type]  # as in VPDSR_API_KEYS
    )
    with live_server(settings, torch_threads=1) as url:
        yield url


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "teal").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer", "Basic Zmlyc3Qta2V5", "first-key"])
def test_api_key_required(secured_url: str, authorization: str | None) -> None:
    headers = {"content-type": "image/png"} | ({"authorization": authorization} if authorization else {})
    response = httpx.post(f"{secured_url}/v1/upscale", content=small_png(), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{secured_url}/v1/models", headers={"authorization": authorization or ""}).status_code == 401


@pytest.mark.parametrize("key", ["first-key", "second-key"])
def test_api_key_accepted(secured_url: str, key: str) -> None:
    auth = {"authorization": f"Bearer {key}"}
    response = httpx.post(f"{secured_url}/v1/upscale", content=small_png(), headers=auth | {"content-type": "image/png"})
    assert response.status_code == 200
    assert httpx.get(f"{secured_url}/v1/models", headers=auth).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_operational_endpoints_stay_open(secured_url: str, path: str) -> None:
    assert httpx.get(f"{secured_url}{path}").status_code == 200


# -- `vpdsr serve` ---------------------------------------------------------------------------------
def test_vpdsr_serve_flags_override_environment(tiny_registry: Path) -> None:
    port = free_port()
    env = os.environ | {
        "VPDSR_MODEL": "nope", "VPDSR_PORT": "1", "VPDSR_REGISTRY": "/nonexistent",  # all overridden by flags
        "VPDSR_DEVICE": "cpu", "VPDSR_MAX_BATCH_SIZE": "1", "OMP_NUM_THREADS": "1",
    }
    command = [VPDSR, "serve", "--registry", str(tiny_registry), "--model", "tiny@production", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, lambda: process.poll() is None, timeout=None)  # fails at once if it exits
        loaded = httpx.get(f"{url}/v1/models").json()["loaded"]
        assert (loaded["name"], loaded["version"], loaded["batch_sizes"]) == ("tiny", "1", [1])
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate()
    assert process.returncode == 0, output


def test_vpdsr_serve_unknown_model_fails_fast(tiny_registry: Path) -> None:
    run = subprocess.run(
        [VPDSR, "serve", "--registry", str(tiny_registry), "--model", "nope@production", "--port", str(free_port())],
        capture_output=True, text=True,
    )
    assert run.returncode == 2
    assert "unknown model 'nope'" in run.stderr and "Traceback" not in run.stderr
