"""A real uvicorn server in a background thread, for tests and benchmarks of the HTTP API.

Real sockets and real HTTP, but in-process: no interpreter start-up or torch import per server,
and several servers with different settings can run side by side on free ports.

Test code (it needs httpx, a dev dependency), so it lives here and not in the ``service`` package;
the benchmarks import it from here too, as they import ``tests.conftest``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.server import Server
from service.settings import Settings


@contextmanager
def live_server(
    settings: Settings, *, torch_threads: int | None = None, ready_timeout: float | None = None
) -> Iterator[str]:
    """Serve ``create_app(settings)`` on ``settings.host:settings.port``; yields the base URL once
    ``/readyz`` says ready (model loaded and warmed), however long that takes on a loaded machine
    (the test's timeout bounds a hang) unless ``ready_timeout`` sets a bound.

    ``torch_threads`` caps PyTorch's intra-op threads meanwhile: the model shares the process
    with the HTTP client, and on a small shared CI machine extra threads only thrash.
    """
    previous_threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    server = Server(create_app(settings), settings, log_level="warning")
    thread = threading.Thread(target=server.run, name=f"uvicorn-{settings.port}", daemon=True)
    thread.start()
    url = f"http://{settings.host}:{settings.port}"
    try:
        wait_ready(url, thread.is_alive, ready_timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        torch.set_num_threads(previous_threads)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``GET {url}/metrics`` parsed: (sample name, labels) → value."""
    text = httpx.get(f"{url}/metrics", timeout=10).raise_for_status().text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_ready(url: str, alive: Callable[[], bool], timeout: float | None) -> None:
    """Poll ``/readyz`` until 200; fail early when the server dies (``alive()`` false) or a check
    failed, and after ``timeout`` seconds unless it is None."""
    deadline = float("inf") if timeout is None else time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server at {url} exited during start-up")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return
            last = response.text
            if any(check["state"].startswith("failed") for check in response.json()["checks"].values()):
                raise RuntimeError(f"server at {url} failed to start: {last}")
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise RuntimeError(f"server at {url} not ready after {timeout} s: {last}")
