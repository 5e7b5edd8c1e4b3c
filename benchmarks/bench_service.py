"""Load test of the HTTP service: latency percentiles, throughput and how well requests batch.

Either targets a running server (``--url``) or starts ``vpdsr serve`` itself as a subprocess
(the deployment's code path, with its own interpreter, so the load generator does not steal the
server's GIL). N requests are sent by C concurrent clients (httpx, asyncio); 429 answers are
counted, not retried. The batch-size distribution, tiles and queue/compute times come from the
server's own ``/metrics`` (difference between before and after the run).

    # CPU, the tests' tiny random model (what benchmarks/results/service-cpu.json holds):
    python benchmarks/bench_service.py --tiny --device cpu -n 200 -c 8 --out benchmarks/results/service-cpu.json
    # the real architecture with random weights on a GPU (what service-cuda.json holds):
    python benchmarks/bench_service.py --random-model --device cuda --dtype bfloat16 --resize 256x176 \\
        -n 96 -c 16 --out benchmarks/results/service-cuda.json
    # a registry model:
    python benchmarks/bench_service.py --registry registry --model vpdsr-small@production --image photo.jpg
    # an already running server:
    python benchmarks/bench_service.py --url http://127.0.0.1:8000 -n 200 -c 8
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT / "tests" / "fixtures" / "service" / "bears.jpg"
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    made = p.add_mutually_exclusive_group()
    made.add_argument("--tiny", action="store_true", help="serve the tests' tiny random model (temporary registry)")
    made.add_argument(
        "--random-model", action="store_true",
        help="serve a randomly initialised model of the real architecture (ModelConfig defaults): a real model's "
        "compute cost without its weights (temporary registry)",
    )
    p.add_argument("--registry", type=Path, default=Path("registry"))
    p.add_argument("--model", default="vpdsr-small@production")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--compile", default="off", help="VPDSR_COMPILE: off, default, max-autotune, reduce-overhead")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-delay-ms", type=float, default=10)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="image to send (default: a 48×32 photo)")
    p.add_argument("--resize", metavar="WxH", help="resize the image (Lanczos) before sending, e.g. 256x176")
    p.add_argument("-n", "--requests", type=int, default=200)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--warmup-requests", type=int, default=8, help="sent first, not measured")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


@contextmanager
def served(args: argparse.Namespace) -> Iterator[str]:
    """``vpdsr serve`` of the arguments' model and settings until the block ends."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        registry, model = args.registry, args.model
        if args.tiny:
            registry, model = Path(tmp), "tiny@production"
            save_tiny_model(registry)
        elif args.random_model:
            registry, model = Path(tmp), "random@production"
            save_random_model(registry)
        env = {
            "VPDSR_DEVICE": args.device,
            "VPDSR_DTYPE": args.dtype,
            "VPDSR_COMPILE": args.compile,
            "VPDSR_MAX_BATCH_SIZE": str(args.max_batch_size),
            "VPDSR_MAX_DELAY_MS": str(args.max_delay_ms),
            "VPDSR_MAX_QUEUE": str(args.max_queue),
            "VPDSR_LOG_LEVEL": "warning",
        }
        with serve_process(registry, model, env) as (url, _):
            yield url


@contextmanager
def serve_process(
    registry: Path, model: str, env: dict[str, str], *, log: Path | None = None, timeout: float = 600
) -> Iterator[tuple[str, float]]:
    """``vpdsr serve`` in a subprocess on a free port, with ``env`` over this process's environment,
    until the block ends; yields its URL and the seconds from spawning it to ``/readyz`` 200 (the
    ready time: imports, model load, warm-up and any compilation). Started as ``python -m
    model.cli``, the console script's target, so that it needs no installed ``vpdsr`` script.
    A server still starting when the block is interrupted is stopped all the same."""
    sys.path.insert(0, str(ROOT))
    from tests.live import wait_ready
    from tests.conftest import free_port

    port = free_port()
    command = [sys.executable, "-m", "model.cli", "serve", "--registry", str(registry), "--model", model]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    output = open(log, "a") if log else None  # noqa: SIM115 - closed below, after the server
    process = subprocess.Popen(
        [*command, "--port", str(port)], env=os.environ | {"PYTHONPATH": path} | env, cwd=ROOT,
        stdout=output, stderr=subprocess.STDOUT if output else None,
    )
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    try:
        wait_ready(url, lambda: process.poll() is None, timeout=timeout)
        yield url, time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if output:
            output.close()


def save_random_model(root: Path, name: str = "random", **config_kw: object) -> None:
    """``<name>:1`` (alias production): the real architecture with freshly initialised weights;
    ``config_kw`` replaces fields of ``ModelConfig()`` (``kind``, ``inference_steps``, ``tile_sizes``)."""
    import dataclasses

    import torch

    from model import ModelConfig, Registry, SwinUNet, VQAutoencoder

    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig(), **config_kw)  # type: ignore[arg-type]
    unet, autoencoder = SwinUNet.from_config(config.unet), VQAutoencoder.from_config(config.autoencoder)
    Registry(root).save(name, "1", config, unet.state_dict(), autoencoder.state_dict(), aliases=("production",))


def image_bytes(path: Path, resize: str | None) -> tuple[bytes, str]:
    """The request body and its content type."""
    media_type = MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    if resize is None:
        return path.read_bytes(), media_type
    from PIL import Image

    width, height = (int(v) for v in resize.lower().split("x"))
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    resized.save(buffer, "JPEG", quality=95)  # a photo, as clients send them (and JPEG out)
    return buffer.getvalue(), "image/jpeg"


def scrape(url: str) -> dict[str, float]:
    """The engine's histograms and counters, flattened to ``name{le}`` → value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).raise_for_status().text
    wanted = ("vpdsr_batch_size", "vpdsr_tiles", "vpdsr_queue_wait_seconds", "vpdsr_compute_seconds")
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            for sample in family.samples:
                le = sample.labels.get("le")
                out[sample.name + (f"{{le={le}}}" if le else "")] = sample.value
    return out


async def load(url: str, body: bytes, media_type: str, total: int, concurrency: int) -> list[tuple[float, int]]:
    """Send ``total`` requests from ``concurrency`` clients; (latency seconds, status) each."""
    results: list[tuple[float, int]] = []
    remaining = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            for _ in remaining:
                started = time.perf_counter()
                response = await client.post("/v1/upscale", content=body, headers={"content-type": media_type})
                results.append((time.perf_counter() - started, response.status_code))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def summarise(args: argparse.Namespace, url: str, results: list[tuple[float, int]], wall: float,
              before: dict[str, float], after: dict[str, float], models: dict) -> dict:
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    ok = np.array([latency for latency, status in results if status == 200]) * 1000
    buckets = sorted(
        ((float(key.split("le=")[1][:-1]), value) for key, value in delta.items()
         if key.startswith("vpdsr_batch_size_bucket") and "+Inf" not in key),
    )
    distribution, previous = {}, 0.0
    for le, cumulative in buckets:
        distribution[str(int(le))] = int(cumulative - previous)
        previous = cumulative
    batches = delta.get("vpdsr_batch_size_count", 0.0)
    requests_done = delta.get("vpdsr_compute_seconds_count", 0.0)
    return {
        "config": {
            "url": args.url or "vpdsr serve (subprocess)",
            "model": models["loaded"],
            "image": str(args.image.relative_to(ROOT) if args.image.is_relative_to(ROOT) else args.image),
            "resize": args.resize,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_batch_size": args.max_batch_size,
            "max_delay_ms": args.max_delay_ms,
            "max_queue": args.max_queue,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        },
        "results": {
            "status_counts": {str(k): v for k, v in sorted(Counter(s for _, s in results).items())},
            "latency_ms": {
                "p50": round(float(np.percentile(ok, 50)), 1),
                "p95": round(float(np.percentile(ok, 95)), 1),
                "p99": round(float(np.percentile(ok, 99)), 1),
                "mean": round(float(ok.mean()), 1),
                "max": round(float(ok.max()), 1),
            },
            "throughput_rps": round(len(ok) / wall, 2),
            "wall_seconds": round(wall, 2),
            "tiles_per_second": round(delta.get("vpdsr_tiles_total", 0.0) / wall, 2),
            "batches": int(batches),
            "mean_batch_size": round(delta.get("vpdsr_batch_size_sum", 0.0) / batches, 2) if batches else None,
            "batch_size_distribution": distribution,  # batches per size bucket (≤ 1, ≤ 2, ≤ 4, …)
            "mean_queue_wait_ms": round(1000 * delta.get("vpdsr_queue_wait_seconds_sum", 0.0) / requests_done, 1)
            if requests_done else None,
            "mean_compute_ms": round(1000 * delta.get("vpdsr_compute_seconds_sum", 0.0) / requests_done, 1)
            if requests_done else None,
        },
    }


def run(args: argparse.Namespace, url: str) -> dict:
    body, media_type = image_bytes(args.image, args.resize)
    asyncio.run(load(url, body, media_type, args.warmup_requests, args.concurrency))
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    before = scrape(url)
    started = time.perf_counter()
    results = asyncio.run(load(url, body, media_type, args.requests, args.concurrency))
    wall = time.perf_counter() - started
    return summarise(args, url, results, wall, before, scrape(url), models)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.url:
        report = run(args, args.url)
    else:
        with served(args) as url:
            report = run(args, url)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
