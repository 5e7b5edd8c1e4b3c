"""Prometheus metrics of the HTTP service and the batching engine (names fixed by the dashboards).

All metrics live on one :class:`~prometheus_client.CollectorRegistry` per :class:`Metrics`
object (not the process-global default), so several apps in one process — tests, or the API
next to an in-process job consumer — never collide. The job metrics (:mod:`jobqueue.metrics`) are
registered on the same ``Metrics.registry`` and come out of the same ``/metrics``.

One process per GPU (uvicorn ``workers=1``), scaled out with more containers / pods, so no
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) is needed or supported.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds; reaches past the default 60 s request timeout so slow tails stay visible.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "vpdsr_requests", "HTTP requests by route template, method and status", ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "vpdsr_request_duration_seconds", "HTTP request latency, body upload to response", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "vpdsr_queue_wait_seconds", "per upscale: admission until its first tile starts computing",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.compute = Histogram(
            "vpdsr_compute_seconds", "per upscale: first tile starts until the image is assembled",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "vpdsr_batch_size", "tiles per model call", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("vpdsr_queue_depth", "tiles waiting for a batch", registry=r)
        self.tiles = Counter("vpdsr_tiles", "tiles computed", registry=r)
        self.model_info = Gauge(
            "vpdsr_model_info", "the served model (value 1)", ["name", "version", "device", "dtype"], registry=r
        )
        self.gpu_memory = Gauge(
            "vpdsr_gpu_memory_bytes", "CUDA memory of this process (0 on CPU)", ["kind"], registry=r
        )
        for kind in ("allocated", "reserved"):
            self.gpu_memory.labels(kind).set(0)

    def set_model(self, name: str, version: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model_info.labels(name, version, str(device), str(dtype).removeprefix("torch.")).set(1)
        if device.type == "cuda":
            readers: dict[str, Callable[[torch.device], int]] = {
                "allocated": torch.cuda.memory_allocated,
                "reserved": torch.cuda.memory_reserved,
            }
            for kind, read in readers.items():
                self.gpu_memory.labels(kind).set_function(lambda read=read: read(device))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts and times every HTTP request, labelled by route *template* (bounded cardinality).

    Pure ASGI rather than ``BaseHTTPMiddleware``, which would hide client disconnects from the
    endpoint. Unknown paths share the label ``unmatched``.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - start)
