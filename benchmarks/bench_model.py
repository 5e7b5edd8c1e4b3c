"""Model-only benchmark: images/s, latency percentiles, peak memory and achieved TFLOP/s.

Runs the full-size architecture (118.59 M Swin-UNet + 55.32 M VQGAN f4, random weights: speed
does not depend on the values) or any registry model, for every (resolution, batch size), for the
eager float32 reference path and the optimised path (bf16, channels-last, torch.compile with CUDA
graphs), plus the 15-step teacher for the speed-up ratio. FLOPs are counted once per shape with
``torch.utils.flop_counter`` and compared with the bf16 matrix-unit floor.

    python benchmarks/bench_model.py --device cuda --out benchmarks/results/model-h100.json \
        --markdown docs/performance.md
    python benchmarks/bench_model.py --device cpu --model tiny --batch-sizes 1,4 --resolutions 16,32 \
        --iters 3 --out benchmarks/results/model-cpu.json   # smoke test of the harness
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, SRPipeline, SwinUNet, VQAutoencoder
from model.device import resolve_device, resolve_dtype

PEAK_BF16_TFLOPS = 790.0  # dense bf16 matrix throughput reached on the H100/H200 here


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


def build(args: argparse.Namespace, device: torch.device, **options: object) -> SRPipeline:
    if args.model:
        return SRPipeline.from_registry(args.model, args.registry, device=device, **options)  # type: ignore[arg-type]
    torch.manual_seed(0)
    cfg = ModelConfig()
    unet, vq = SwinUNet.from_config(cfg.unet), VQAutoencoder.from_config(cfg.autoencoder)
    return SRPipeline(cfg, unet, vq, device=device, name="full-random", **options)  # type: ignore[arg-type]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def count_flops(pipe: SRPipeline, lr: torch.Tensor, noise: torch.Tensor, steps: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        pipe._tiles_forward(lr.to(pipe.device), noise.to(pipe.device, pipe.dtype), steps)
    return float(counter.get_total_flops())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench(pipe: SRPipeline, label: str, resolution: int, batch: int, steps: int, args: argparse.Namespace) -> Row:
    device = pipe.device
    lr = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    noise = torch.randn(batch, pipe.config.autoencoder.embed_dim, resolution, resolution)
    flops = count_flops(pipe, lr[:1], noise[:1], steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(lambda: pipe.run_tiles(lr, noise, steps), device, args.iters, args.warmup)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
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
        peak_mem_gib=peak,
        tflop_per_image=flops / 1e12,
        achieved_tflops=flops * batch / per_batch / 1e12,
        floor_ms_per_image=1e3 * flops / (PEAK_BF16_TFLOPS * 1e12),
    )


def large_image(pipe: SRPipeline, side: int) -> dict[str, float]:
    """A side×side input through the tiled path: wall time and peak GPU memory."""
    import numpy as np

    image = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    start = time.perf_counter()
    pipe(image, seed=0)
    sync(pipe.device)
    peak = torch.cuda.max_memory_allocated(pipe.device) / 2**30 if pipe.device.type == "cuda" else 0.0
    return {"input_side": side, "seconds": time.perf_counter() - start, "peak_mem_gib": peak}


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
    parser.add_argument("--paths", default="eager-fp32,optimised", help="eager-fp32, optimised, teacher")
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
    compile_mode = args.compile_mode if device.type == "cuda" else None
    variants = {
        "eager-fp32": dict(dtype=torch.float32),
        "optimised": dict(dtype=resolve_dtype(args.opt_dtype), channels_last=True, compile_mode=compile_mode),
        "teacher": dict(dtype=resolve_dtype(args.opt_dtype), channels_last=True, compile_mode=compile_mode),
    }
    rows: list[Row] = []
    extras: dict[str, object] = {}
    for label in args.paths.split(","):
        pipe = build(args, device, **variants[label])
        steps = args.teacher_steps if label == "teacher" else 1
        for res in resolutions:
            for batch in batches:
                row = bench(pipe, label, res, batch, steps, args)
                rows.append(row)
                print(json.dumps(asdict(row)), flush=True)
        if label == "optimised" and args.large_side:
            extras["large_image"] = large_image(pipe, args.large_side)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "driver": torch.version.cuda or "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    command = "python " + " ".join(["benchmarks/bench_model.py", *__import__("sys").argv[1:]])
    result = {"environment": env, "command": command, "rows": [asdict(r) for r in rows], **extras}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows, env, command))


if __name__ == "__main__":
    main()
