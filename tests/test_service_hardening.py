"""Red-team findings of issue 15 on the HTTP layer, each reproduced over real sockets.

Stalled and trickled uploads (408), the connection limit and keep-alive timeout, a SIGTERM
that must not wait for a stalled upload nor keep consuming jobs, 405/HEAD, the multipart
schema, and error bodies that never show the registry path or Redis's address.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from service.settings import Settings
from tests.conftest import RedisServer, free_port, random_png
from tests.live import live_server, wait_ready

pytestmark = pytest.mark.timeout(180)

IDLE_S, TOTAL_S = 1.5, 4.0  # body timeouts of the module's server
HEADER_S = 2.0  # its header timeout
MAX_CONNECTIONS = 8
DEAD_REDIS_PORT = free_port()  # nothing listens there: the job queue is "in an outage" throughout
VPDSR = str(Path(sys.executable).with_name("vpdsr"))


@pytest.fixture(scope="module")
def url(tiny_registry: Path) -> Iterator[str]:
    settings = Settings(
        registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(), max_batch_size=1,
        body_idle_timeout_s=IDLE_S, body_timeout_s=TOTAL_S, max_connections=MAX_CONNECTIONS, keep_alive_timeout_s=1,
        header_timeout_s=HEADER_S,
        redis_url=f"redis://127.0.0.1:{DEAD_REDIS_PORT}/0",
    )
    with live_server(settings, torch_threads=1) as base:
        yield base


# -- raw HTTP/1.1 ----------------------------------------------------------------------------------
def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def start_upload(url: str, declared: int, first_part: bytes, path: str = "/v1/upscale") -> socket.socket:
    """A POST that declares ``declared`` body bytes and sends only ``first_part`` of them."""
    sock = connect(url)
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: {declared}\r\n\r\n"
    sock.sendall(head.encode() + first_part)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not in time)."""
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_and_body(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def assert_request_timeout(raw: bytes, fragment: str) -> None:
    status, headers, body = status_and_body(raw)
    assert status == 408, raw[:500]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    error = httpx.Response(408, content=body).json()["error"]
    assert error["code"] == "request_timeout" and fragment in error["message"]


# -- body timeouts ---------------------------------------------------------------------------------
def test_stalled_uploads_get_408_and_others_are_served_meanwhile(url: str) -> None:
    """Red team: 40 stalled 24 MiB uploads held 944 MB indefinitely."""
    stalled = [start_upload(url, 24 * 1024 * 1024, b"\x89PNG\r\n\x1a\n" + bytes(64 * 1024)) for _ in range(4)]
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=10) as other:
        assert other.get("/healthz").status_code == 200
        upscaled = other.post("/v1/upscale", content=random_png(8), headers={"content-type": "image/png"})
        assert upscaled.status_code == 200
    served_within = time.monotonic() - started
    assert served_within < IDLE_S, "another client waited for the stalled uploads"
    for sock in stalled:
        with sock:
            assert_request_timeout(read_until_closed(sock, timeout=IDLE_S + 5), f"no request body data for {IDLE_S:g} s")
    assert IDLE_S - 0.3 <= time.monotonic() - started < IDLE_S + 3


def test_trickled_body_gets_408_at_the_total_limit(url: str) -> None:
    """A client that sends a byte just before each idle timeout still meets the whole-body limit."""
    with start_upload(url, 1_000_000, b"\x89PNG") as sock:
        started = time.monotonic()
        while not select.select([sock], [], [], IDLE_S / 2)[0]:  # stop sending once the answer is there
            sock.sendall(b"\0")
            assert time.monotonic() - started < TOTAL_S + 5, "no answer to a trickled body"
        assert_request_timeout(read_until_closed(sock, timeout=5), f"took longer than {TOTAL_S:g} s")
    assert TOTAL_S - 0.5 <= time.monotonic() - started < TOTAL_S + 2


def test_slow_upload_within_the_limits_succeeds(url: str) -> None:
    """The idle timeout is per chunk: pauses shorter than it, within the total, are fine."""
    data = random_png(8)
    pieces = [data[: len(data) // 2], data[len(data) // 2 :]]
    with start_upload(url, len(data), pieces[0]) as sock:
        time.sleep(IDLE_S * 0.6)
        sock.sendall(pieces[1])
        sock.settimeout(30)
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(65536)
    status, headers, _ = status_and_body(response)
    assert status == 200 and headers["content-type"] == "image/png"


# -- connections -----------------------------------------------------------------------------------
def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closed ``sock`` (its answer, if any, read and dropped)."""
    started = time.monotonic()
    read_until_closed(sock, timeout)
    return time.monotonic() - started


def test_idle_connections_lock_no_one_out_and_are_closed(url: str) -> None:
    """Red team (issue 30): 63 connections that never sent a byte held every client, health probes
    included, at plain-text 503 for as long as they stayed open. Now more idle connections than
    the limit leave room for probes and requests, and each is closed after the header timeout."""
    idle = [connect(url) for _ in range(MAX_CONNECTIONS * 2)]
    half_headers = connect(url)
    half_headers.sendall(b"GET /healthz HTTP/1.1\r\nHost: te")  # a header that never ends
    try:
        with httpx.Client(base_url=url, timeout=10) as other:
            for _ in range(3):
                assert other.get("/healthz").status_code == 200
                assert other.get("/readyz").status_code == 200
                upscaled = other.post("/v1/upscale", content=random_png(8), headers={"content-type": "image/png"})
                assert upscaled.status_code == 200, upscaled.text
        assert wait_closed(half_headers, HEADER_S + 5) < HEADER_S + 5
        for sock in idle:  # evicted for newcomers, or closed at the header timeout
            wait_closed(sock, HEADER_S + 5)
    finally:
        for sock in (*idle, half_headers):
            sock.close()


def test_requests_over_the_limit_get_json_503_and_probes_still_answer(url: str) -> None:
    stalled = [start_upload(url, 1_000_000, b"\x89PNG") for _ in range(MAX_CONNECTIONS)]
    try:
        with httpx.Client(base_url=url, timeout=10) as other:
            deadline = time.monotonic() + 10  # until the server has read every stalled request's headers
            while (busy := other.post("/v1/upscale", content=random_png(8),
                                      headers={"content-type": "image/png"})).status_code != 503:
                assert time.monotonic() < deadline, busy.text
            assert busy.json()["error"]["code"] == "busy" and busy.headers["retry-after"] == "1"
            assert other.get("/healthz").status_code == 200 and other.get("/readyz").status_code == 200
            assert other.get("/metrics").status_code == 200
    finally:
        for sock in stalled:
            sock.close()


def test_idle_keep_alive_connection_is_closed(url: str) -> None:
    with connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        started = time.monotonic()
        raw = read_until_closed(sock, timeout=10)  # the answer, then the close after keep_alive_timeout_s
    assert status_and_body(raw)[0] == 200
    assert 0.8 <= time.monotonic() - started < 5


# -- methods ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/jobs/0123abc", "DELETE, GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
        ("GET", "/v1/upscale", "POST"),
        ("HEAD", "/v1/upscale", "POST"),
    ],
)
def test_405_names_every_allowed_method(client: httpx.Client, method: str, path: str, allowed: str) -> None:
    """Red team: every 405 said "allowed: none", and /v1/jobs/{id} did not allow DELETE."""
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    if method != "HEAD":
        error = response.json()["error"]
        assert error["code"] == "method_not_allowed" and error["message"].endswith(f"allowed: {allowed}")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v1/models", "/openapi.json"])
def test_head_answers_like_get_without_a_body(client: httpx.Client, path: str) -> None:
    head, get = client.head(path), client.get(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    if path in ("/healthz", "/v1/models", "/openapi.json"):  # the others may change between the two calls
        assert head.headers["content-length"] == str(len(get.content))


# -- what error bodies show ------------------------------------------------------------------------
def test_multipart_option_fields_are_not_nullable(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/upscale", "/v1/jobs"):
        form = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        fields = {name: schema for name, schema in form["properties"].items() if name != "image"}
        assert {"model", "scale", "format", "quality", "seed", "steps", "tile"} <= set(fields)
        for name, schema in fields.items():
            assert "null" not in str(schema) and schema.get("type") in ("string", "integer"), (path, name, schema)
        assert fields["format"]["enum"] == ["png", "jpeg", "webp"] and fields["quality"]["minimum"] == 1


def test_unknown_model_404_does_not_show_the_registry_path(client: httpx.Client, tiny_registry: Path) -> None:
    response = client.post(
        "/v1/upscale", params={"model": "nope"}, content=random_png(8), headers={"content-type": "image/png"}
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "unknown model 'nope'" in response.text
    assert str(tiny_registry) not in response.text and tiny_registry.name not in response.text


def test_readyz_does_not_show_the_redis_address(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"]["job_queue"] == {"ok": True, "state": "unavailable: redis unavailable"}
    assert str(DEAD_REDIS_PORT) not in response.text and "127.0.0.1" not in response.text


def test_readyz_does_not_show_why_the_model_failed_to_load(tiny_registry: Path, tmp_path: Path) -> None:
    broken = tmp_path / "registry"
    shutil.copytree(tiny_registry, broken)
    (broken / "tiny" / "1" / "model.safetensors").unlink()  # the load error names the missing file
    settings = Settings(registry=broken, model="tiny@production", device="cpu", port=free_port())
    with pytest.raises(RuntimeError, match="failed to start") as failed:
        with live_server(settings, torch_threads=1):
            pass
    readyz = str(failed.value)  # wait_ready quotes the /readyz body that said "failed"
    assert '"model":{"ok":false,"state":"failed"}' in readyz and str(tmp_path) not in readyz


# -- shutdown --------------------------------------------------------------------------------------
def test_sigterm_stops_consuming_at_once_and_exits_despite_a_stalled_upload(
    tiny_registry: Path, redis_server: RedisServer
) -> None:
    """Red team: SIGTERM to an API that consumes jobs refused connections but never exited (a stalled
    upload), and its consumer took 30 new jobs meanwhile."""
    shutdown_timeout_s = 2
    port = free_port()
    env = os.environ | {
        "VPDSR_REDIS_URL": redis_server.url, "VPDSR_DEVICE": "cpu", "VPDSR_MAX_BATCH_SIZE": "1",
        "VPDSR_SHUTDOWN_TIMEOUT_S": str(shutdown_timeout_s), "VPDSR_BODY_IDLE_TIMEOUT_S": "300",
        "VPDSR_BODY_TIMEOUT_S": "300", "VPDSR_JOB_BLOCK_MS": "100", "VPDSR_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": "1",
    }
    command = [VPDSR, "serve", "--registry", str(tiny_registry), "--model", "tiny@production", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # An API that only queues, on the same Redis: it submits the jobs once the other one is stopping.
    enqueuer = Settings(
        registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(), max_batch_size=1,
        redis_url=redis_server.url, consume_jobs=False,
    )
    try:
        serving = f"http://127.0.0.1:{port}"
        wait_ready(serving, lambda: process.poll() is None, timeout=120)
        with live_server(enqueuer, torch_threads=1) as queue_url, httpx.Client(base_url=queue_url, timeout=30) as api:
            stalled = start_upload(serving, 24 * 1024 * 1024, bytes(64 * 1024))
            time.sleep(0.3)  # the upload is in progress
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.5)
            with ThreadPoolExecutor(4) as pool:
                submitted = list(pool.map(
                    lambda seed: api.post("/v1/jobs", content=random_png(8, seed), headers={"content-type": "image/png"}),
                    range(8),
                ))
            assert [response.status_code for response in submitted] == [202] * 8
            output, _ = process.communicate(timeout=shutdown_timeout_s + 20)
            exited_after = time.monotonic() - signalled
            stalled.close()
            jobs = [api.get(response.json()["status_url"]).json() for response in submitted]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert exited_after < shutdown_timeout_s + 8, output
    assert process.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal it handled
    assert "timeout graceful shutdown exceeded" in output, output  # the stalled upload was cut
    assert [(job["state"], job["attempts"]) for job in jobs] == [("queued", 0)] * 8, "taken by a stopping consumer"
