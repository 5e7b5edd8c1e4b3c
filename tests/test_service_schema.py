"""Schemathesis fuzzes every operation of the live server's OpenAPI schema: no 5xx, ever."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.settings import Settings
from tests.conftest import free_port
from tests.live import live_server


def test_openapi_fuzzing_finds_no_server_errors(tiny_registry: Path, tmp_path: Path, redis_server) -> None:
    # With Redis, so /v1/jobs* are exercised too (without it they answer 503 jobs_disabled by design).
    settings = Settings(
        registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(),
        max_batch_size=1, max_delay_ms=0, max_pixels=64 * 64, max_body_bytes=64 * 1024,
        redis_url=redis_server.url,
    )
    with live_server(settings, torch_threads=1) as url:
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
                "--checks", "not_a_server_error", "--max-examples", "50", "--workers", "1", "--seed", "0",
                "--generation-database", "none", "--request-timeout", "30", "--no-color",
            ],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
