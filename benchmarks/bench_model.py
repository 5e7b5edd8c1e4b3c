"""Model-only benchmark: images/s, latency percentiles, peak memory and achieved TFLOP/s.

Runs the full-size architecture (118.59 M Swin-UNet + 55.32 M VQGAN f4, random weights: speed
does not depend on the values) or any registry model, for every (resolution, batch size), on the
paths of :data:`PATHS`: the eager float32 reference, eager bf16, and the optimised path (bf16,
channels-last, torch.compile), plus the 15-step teacher for the speed-up ratio. FLOPs are counted
once per shape with ``torch.utils.flop_counter`` and compared with the bf16 matrix-unit floor.
Latency comes from CUDA events on a GPU (the device's clock), after warm-up calls that compile.

    python benchmarks/bench_model.py --device cuda --out benchmarks/results/model-h100.json \
        --markdown docs/performance.md
    python benchmarks/bench_model.py --device cpu --model tiny --batch-sizes 1,4 --resolutions 16,32 \
        --iters 3 --out benchmarks/results/model-cpu.json   # smoke test of the harness
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, SRPipeline, SwinUNet, VQAutoencoder
from model.device import resolve_device, resolve_dtype
from model.pipeline import ImageInput

PEAK_BF16_TFLOPS = 790.0  # dense bf16 matrix throughput reached on the H100/H200 here
PATHS = ("eager-fp32", "eager-bf16", "optimised", "teacher")


@dataclass
class Row:
    path: str
    resolution: int
    batch: int
    steps: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    peak_mem_gib: float
    tflop_per_image: float
    achieved_tflops: float
    floor_ms_per_image: float


@dataclass(frozen=True)
class Timing:
    """How long to measure one shape: ``warmup`` calls (compilation, CUDA graph recording), then
    ``iters`` timed calls, or fewer once ``max_seconds`` have passed (never fewer than ``min_iters``):
    a batch of 64 float32 images takes seconds, so a fixed count would not fit a device lease."""

    iters: int = 20
    warmup: int = 3
    max_seconds: float = float("inf")
    min_iters: int = 3


def path_options(label: str, device: torch.device, compile_mode: str | None, dtype: str = "bfloat16") -> dict[str, object]:
    """SRPipeline options of a benchmark path; torch.compile only on CUDA here (on the CPU,
    ``benchmarks/bench_cpu.py`` measures whether it pays). The eager paths keep the contiguous layout."""
    half = resolve_dtype(dtype)
    fast = dict(dtype=half, channels_last=True, compile_mode=compile_mode if device.type == "cuda" else None)
    paths = {
        "eager-fp32": dict(dtype=torch.float32, channels_last=False),
        "eager-bf16": dict(dtype=half, channels_last=False),
        "optimised": fast,
        "teacher": fast,
    }
    return paths[label]


def build(
    device: torch.device, model: str | None = None, registry: str | Path | None = None, **options: object
) -> SRPipeline:
    """A registry model, or (``model`` None) the full-size architecture with seeded random weights."""
    if model:
        return SRPipeline.from_registry(model, registry, device=device, **options)  # type: ignore[arg-type]
    torch.manual_seed(0)
    cfg = ModelConfig()
    unet, vq = SwinUNet.from_config(cfg.unet), VQAutoencoder.from_config(cfg.autoencoder)
    return SRPipeline(cfg, unet, vq, device=device, name="full-random", **options)  # type: ignore[arg-type]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, timing: Timing) -> list[float]:
    """Seconds of each timed call of ``fn`` after the warm-up calls."""
    for _ in range(timing.warmup):
        fn()
    sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < timing.iters:
        if len(times) >= timing.min_iters and time.perf_counter() - started > timing.max_seconds:
            break
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            begin_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin_s)
    return times


def count_flops(pipe: SRPipeline, resolution: int, steps: int) -> float:
    """FLOPs of one tile of ``resolution`` LR pixels on the eager path, counted on fake tensors: no
    time spent computing (on a CPU that takes as long as a timed run). The networks are a fresh,
    uninitialised copy of ``pipe``'s architecture, so that no cache of ``pipe`` (the Swin
    attention masks) ever holds a fake tensor."""
    config, ls = pipe.config, pipe.latent_scale
    with torch.device("meta"):
        unet, autoencoder = SwinUNet.from_config(config.unet), VQAutoencoder.from_config(config.autoencoder)
    shapes = SRPipeline(
        config, unet.to_empty(device=pipe.device), autoencoder.to_empty(device=pipe.device), device=pipe.device,
        dtype=torch.float32, channels_last=False, threads=pipe.threads,
    )
    with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter, torch.inference_mode():
        lr = torch.zeros(1, 3, resolution, resolution, device=pipe.device)
        noise = torch.zeros(1, pipe.latent_channels, resolution * ls, resolution * ls, device=pipe.device)
        shapes._tiles_forward(lr, noise, steps)
    return float(counter.get_total_flops())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench(pipe: SRPipeline, label: str, resolution: int, batch: int, steps: int, flops: float, timing: Timing) -> Row:
    """Time one (resolution, batch) shape; ``flops`` per image from :func:`count_flops`."""
    device = pipe.device
    lr = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    side = resolution * pipe.latent_scale
    noise = torch.randn(batch, pipe.latent_channels, side, side)
    reset_peak_memory(device)
    times = timed(lambda: pipe.run_tiles(lr, noise, steps), device, timing)
    per_batch = statistics.median(times)
    return Row(
        path=label,
        resolution=resolution,
        batch=batch,
        steps=steps,
        images_per_s=batch / per_batch,
        p50_ms=1e3 * percentile(times, 0.5),
        p95_ms=1e3 * percentile(times, 0.95),
        p99_ms=1e3 * percentile(times, 0.99),
        peak_mem_gib=peak_memory_gib(device),
        tflop_per_image=flops / 1e12,
        achieved_tflops=flops * batch / per_batch / 1e12,
        floor_ms_per_image=1e3 * flops / (PEAK_BF16_TFLOPS * 1e12),
    )


def large_image(pipe: SRPipeline, side: int) -> dict[str, float]:
    """A side×side input through the tiled path: wall time and peak GPU memory."""
    image = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    reset_peak_memory(pipe.device)
    start = time.perf_counter()
    pipe(image, seed=0)
    sync(pipe.device)
    seconds = time.perf_counter() - start
    return {"side": side, "seconds": seconds, "peak_mem_gib": peak_memory_gib(pipe.device)}


def relative_error(reference: SRPipeline, candidate: SRPipeline, image: ImageInput) -> float:
    """‖candidate − reference‖ / ‖reference‖ over the SR tiles of ``image``, same tiles and noise."""
    plan = reference.plan(image, seed=0)
    lr = torch.stack([tile.lr for tile in plan.tiles])
    noise = torch.stack([tile.noise for tile in plan.tiles])
    expected = reference.run_tiles(lr, noise)
    return float((candidate.run_tiles(lr, noise) - expected).norm() / expected.norm())


def environment(device: torch.device) -> dict[str, str]:
    """What the numbers were measured on: device name, NVIDIA driver, CUDA, torch and Python versions."""
    driver = "none"
    if device.type == "cuda" and shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = (subprocess.run(query, capture_output=True, text=True, check=False).stdout.split() or ["unknown"])[0]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "driver": driver,
        "cuda": torch.version.cuda or "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def markdown(rows: list[Row], env: dict[str, str], command: str) -> str:
    lines = [
        "| path | LR px | batch | steps | images/s | p50 ms | p95 ms | peak GiB | TFLOP/img | TFLOP/s | floor ms/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.path} | {r.resolution} | {r.batch} | {r.steps} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | "
            f"{r.p95_ms:.1f} | {r.peak_mem_gib:.2f} | {r.tflop_per_image:.3f} | {r.achieved_tflops:.1f} | "
            f"{r.floor_ms_per_image:.2f} |"
        )
    head = ", ".join(f"{k}: {v}" for k, v in env.items())
    return f"Environment: {head}\n\nCommand: `{command}`\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="registry ref (default: full-size random weights)")
    parser.add_argument("--registry", default=None)
    parser.add_argument("--resolutions", default="64,128", help="LR tile sizes")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--paths", default="eager-fp32,optimised", help=", ".join(PATHS))
    parser.add_argument("--opt-dtype", default="bfloat16")
    parser.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode for the optimised path")
    parser.add_argument("--teacher-steps", type=int, default=15)
    parser.add_argument("--large-side", type=int, default=0, help="also run one side×side image tiled")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    resolutions = [int(v) for v in args.resolutions.split(",")]
    batches = [int(v) for v in args.batch_sizes.split(",")]
    timing = Timing(iters=args.iters, warmup=args.warmup)
    rows: list[Row] = []
    extras: dict[str, object] = {}
    flops: dict[tuple[int, int], float] = {}
    for label in args.paths.split(","):
        pipe = build(device, args.model, args.registry, **path_options(label, device, args.compile_mode, args.opt_dtype))
        steps = args.teacher_steps if label == "teacher" else 1
        for res in resolutions:
            if (res, steps) not in flops:
                flops[res, steps] = count_flops(pipe, res, steps)
            for batch in batches:
                row = bench(pipe, label, res, batch, steps, flops[res, steps], timing)
                rows.append(row)
                print(json.dumps(asdict(row)), flush=True)
        if label == "optimised" and args.large_side:
            extras["large_image"] = large_image(pipe, args.large_side)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()

    env = environment(device)
    command = "python " + " ".join(["benchmarks/bench_model.py", *sys.argv[1:]])
    result = {"environment": env, "command": command, "rows": [asdict(r) for r in rows], **extras}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows, env, command))


if __name__ == "__main__":
    main()
