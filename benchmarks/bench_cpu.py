"""CPU benchmark (issue 28): the machine's own ceiling, the model's fast path against float32, Real-ESRGAN
x4plus on the same images, the HTTP service at saturation, torch.compile, and the quality guard.

One run, one process, the same images throughout, so every ratio compares like with like:

- ``ceiling``: GEMM and 3×3-convolution GFLOP/s, float32 and bf16, at one thread and at all the
  threads the process may use: what "% of ceiling" below is measured against;
- ``models``: for ``--model`` (a registry model) and the full-size architecture (the official
  ResShift config's shape with seeded random weights: speed does not depend on their values), at
  each LR side of ``--sizes`` (64→256 and 128→512 by default): images/s and p50 latency of a whole
  image through ``SRPipeline.__call__``, on the float32 reference path (contiguous layout, the tile
  rule without measurements) and on the fast path (``auto``: what the service and ``vpdsr upscale``
  run, tiles chosen by warm-up cost); FLOPs per image (``torch.utils.flop_counter``); % of ceiling;
  the quality guard (PSNR of the fast path's output against float32's, same seed);
- ``realesrgan``: Real-ESRGAN x4plus (``training/realesrgan.py``, the ``compare`` extra) on the same
  images, float32 as its users run it on a CPU, and bf16 autocast + channels-last;
- ``http``: ``vpdsr serve`` (fast path) at saturation with ``--model``, the smallest size: images/s,
  p50, the HTTP overhead as a share of the model-only time, ``/healthz`` p50 while saturated;
- ``compile``: per tile size of ``--model``, eager against ``torch.compile`` on the fast path's dtype
  (batches of ``max_tile_batch`` tiles), the compile time (paid in the service's warm-up), the verdict.

bf16 rows run only on CPUs with bf16 matrix units (``model.device.cpu_bf16_units``): elsewhere bf16 is
emulated (the ceiling part measures by how much) and the rows say they were skipped and why.

    python benchmarks/bench_cpu.py --model vpdsr-small@production --out benchmarks/results/cpu.json \\
        --markdown /tmp/cpu.md
    python benchmarks/bench_cpu.py --quick --model tiny --registry REG --no-full-size --out /tmp/cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_model import Timing, build, count_flops  # noqa: E402  (benchmarks/, next to this script)
from bench_service import load, serve_process  # noqa: E402

from model.device import cpu_bf16_units, usable_cpus  # noqa: E402
from model.pipeline import SRPipeline  # noqa: E402
from training.quality import psnr, to_rgb_array  # noqa: E402

CPU = torch.device("cpu")
DEFAULT_IMAGE = ROOT / "tests" / "fixtures" / "realset" / "bears.jpg"
PARTS = ("ceiling", "models", "realesrgan", "http", "compile")
GUARD_DB = 40.0
FULL_SIZE = "full-size architecture (ModelConfig defaults = the official ResShift x4 config), random weights"


@dataclass(frozen=True)
class Budget:
    """How much of each measurement a run makes: the full run, or ``--quick`` for development."""

    gemm_side: int
    conv_channels: int
    conv_side: int
    kernel_seconds: float
    timing: Timing
    http_requests: int

    @classmethod
    def of(cls, quick: bool) -> Budget:
        if quick:
            return cls(256, 32, 32, 0.2, Timing(iters=2, warmup=1, max_seconds=5, min_iters=1), 6)
        # A full-size 128→512 image takes minutes in float32 on a small CPU: one timed call may be all.
        return cls(1024, 64, 128, 1.0, Timing(iters=5, warmup=1, max_seconds=30, min_iters=1), 48)


# -- the machine's ceiling ---------------------------------------------------------------------------
def rate(fn: Callable[[], object], flops: float, seconds: float) -> float:
    """GFLOP/s of ``fn`` (``flops`` per call): one warm-up call, then calls until ``seconds`` passed."""
    fn()
    calls, started = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return flops * calls / (time.perf_counter() - started) / 1e9


def ceiling(budget: Budget, threads: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """{kernel: {dtype: {threads: GFLOP/s}}}: a square GEMM, and a 3×3 convolution (stride 1, same
    padding, channels-last: the autoencoder's layer) at the widths and map size of the budget."""
    n, c, side = budget.gemm_side, budget.conv_channels, budget.conv_side
    out: dict[str, dict[str, dict[str, float]]] = {"gemm": {}, "conv3x3": {}}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            x = torch.randn(1, c, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, c, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
            out["gemm"][name], out["conv3x3"][name] = {}, {}
            for count in threads:
                torch.set_num_threads(count)
                out["gemm"][name][str(count)] = rate(lambda: a @ b, 2 * n**3, budget.kernel_seconds)
                conv_flops = 2 * c * c * 9 * side * side
                out["conv3x3"][name][str(count)] = rate(lambda: F.conv2d(x, w, padding=1), conv_flops, budget.kernel_seconds)
    torch.set_num_threads(threads[-1])
    return out


# -- images ------------------------------------------------------------------------------------------
def lr_images(path: Path, sizes: list[int]) -> dict[int, Image.Image]:
    """The same LR images for every method: a centre square of a photo, resized to each side."""
    with Image.open(path) as photo:
        rgb = photo.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    return {size: square.resize((size, size), Image.Resampling.LANCZOS) for size in sizes}


def side_by_side(fns: dict[str, Callable[[], object]], timing: Timing) -> dict[str, float]:
    """Median wall seconds per call of each of ``fns``, timed in alternation (one call of each per
    round) so that every contender sees the same load: on a shared CPU the load drifts by more than
    the differences measured here."""
    for fn in fns.values():
        for _ in range(timing.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    for round_ in range(timing.iters):
        if round_ >= timing.min_iters and time.perf_counter() - started > timing.max_seconds:
            break
        for name, fn in fns.items():
            begin = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


# -- the models --------------------------------------------------------------------------------------
@dataclass
class ModelRow:
    model: str
    path: str  # "float32" (the reference) or "fast" (auto)
    dtype: str
    lr: int
    sr: int
    tile: int
    tiles: int
    images_per_s: float
    p50_ms: float
    gflop_per_image: float
    gflops: float
    ceiling_gflops: float  # 3×3 convolution, this path's dtype, all threads
    ceiling_pct: float


def model_part(
    label: str, weights: str, make: Callable[..., SRPipeline], images: dict[int, Image.Image], budget: Budget,
    conv_ceiling: dict[str, dict[str, float]], threads: int,
) -> dict[str, Any]:
    """Reference and fast path of one model on every image: rows, the fast path's tile choice, the guard."""
    reference = make(dtype=torch.float32, channels_last=False)
    fast = make()
    fast.warmup([1])  # as the service starts: the tile costs that layout() picks by
    steps = fast.check_steps(None)
    paths = {"float32": reference, "fast": fast}
    flops_per_tile: dict[int, float] = {}
    rows, guard = [], {}
    for size, image in images.items():
        seconds = side_by_side({name: partial(pipe, image, seed=0) for name, pipe in paths.items()}, budget.timing)
        for name, pipe in paths.items():
            grid = pipe.layout(size, size)
            if grid.tile not in flops_per_tile:
                flops_per_tile[grid.tile] = count_flops(reference, grid.tile, steps)
            flops, dtype = flops_per_tile[grid.tile] * len(grid.boxes), str(pipe.dtype).removeprefix("torch.")
            top = conv_ceiling[dtype][str(threads)]
            rows.append(ModelRow(
                label, name, dtype, size, size * pipe.scale, grid.tile, len(grid.boxes), 1 / seconds[name],
                1e3 * seconds[name], flops / 1e9, flops / seconds[name] / 1e9, top, 100 * flops / seconds[name] / 1e9 / top,
            ))
            print(json.dumps(asdict(rows[-1])), flush=True)
        outputs = {name: to_rgb_array(pipe(image, seed=0)) for name, pipe in paths.items()}
        # 100 dB stands for identical outputs (JSON has no infinity).
        guard[str(size)] = min(100.0, psnr(outputs["fast"], outputs["float32"]))
    return {
        "model": label,
        "weights": weights,
        "fast_path": fast.describe_path(),
        "tile_sizes": list(fast.tile_sizes),
        "tile_seconds": fast.tile_seconds,
        "rows": [asdict(row) for row in rows],
        "guard_psnr_db": guard,
    }


# -- Real-ESRGAN x4plus ------------------------------------------------------------------------------
def in_bf16(fn: Callable[..., object], *args: object) -> object:
    """``fn(*args)`` under CPU bf16 autocast."""
    with torch.autocast("cpu", torch.bfloat16):
        return fn(*args)


def realesrgan_part(images: dict[int, Image.Image], budget: Budget, bf16: bool) -> dict[str, Any]:
    """Real-ESRGAN x4plus on the same images: float32 as its users run it on a CPU (contiguous), and
    bf16 autocast + channels-last where the CPU has bf16 units. FLOPs on fake tensors."""
    from training.realesrgan import PREPADDING, load_x4plus, upscale

    network = load_x4plus(CPU)
    variants: dict[str, Callable[[Image.Image], object]] = {"float32": partial(upscale, network)}
    if bf16:
        fast_network = copy.deepcopy(network).to(memory_format=torch.channels_last)
        variants["bfloat16"] = partial(in_bf16, upscale, fast_network)
    rows: list[dict[str, Any]] = []
    for size, image in images.items():
        padded = size + 2 * min(PREPADDING, size - 1)
        with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
            with torch.inference_mode():
                network(torch.zeros(1, 3, padded, padded))
        flops = float(counter.get_total_flops())
        seconds = side_by_side({dtype: partial(run, image) for dtype, run in variants.items()}, budget.timing)
        for dtype in variants:
            rows.append({"dtype": dtype, "lr": size, "images_per_s": 1 / seconds[dtype], "p50_ms": 1e3 * seconds[dtype],
                         "gflop_per_image": flops / 1e9, "gflops": flops / seconds[dtype] / 1e9})
            print(json.dumps({"realesrgan": rows[-1]}), flush=True)
    skipped = None if bf16 else "bf16: this CPU has no bf16 matrix units (emulated bf16: see the ceiling)"
    return {"rows": rows, "skipped": skipped}


# -- HTTP --------------------------------------------------------------------------------------------
async def saturate(url: str, body: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    """``requests`` uploads from ``concurrency`` clients while ``/healthz`` is polled every 50 ms."""
    done = asyncio.Event()
    health: list[float] = []

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while not done.is_set():
                started = time.perf_counter()
                (await client.get("/healthz")).raise_for_status()
                health.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe())
    started = time.perf_counter()
    results = await load(url, body, "image/png", requests, concurrency)
    wall = time.perf_counter() - started
    done.set()
    await prober
    ok = [seconds for seconds, status in results if status == 200]
    return {
        "requests": requests, "concurrency": concurrency, "ok": len(ok), "wall_s": wall,
        "images_per_s": len(ok) / wall, "p50_ms": 1e3 * statistics.median(ok) if ok else None,
        "healthz_p50_ms": 1e3 * statistics.median(health) if health else None, "healthz_probes": len(health),
    }


def http_part(
    model: str, registry: Path, image: Image.Image, budget: Budget, model_seconds: float | None
) -> dict[str, Any]:
    """``vpdsr serve`` on the fast path (its defaults) at saturation: twice the batch size in flight.
    The HTTP overhead is the seconds per image through HTTP over the model-only seconds of the
    models part (same model, path and image), minus one; None without that part."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    batch = 8
    # Limits out of the way: a slow CPU must queue, not refuse (429/413), to be measured at saturation.
    env = {"VPDSR_DEVICE": "cpu", "VPDSR_LOG_LEVEL": "warning", "VPDSR_MAX_BATCH_SIZE": str(batch),
           "VPDSR_MAX_QUEUE": "100000", "VPDSR_REQUEST_TIMEOUT_S": "3600"}
    with serve_process(registry, model, env) as (url, ready_s):
        loaded = httpx.get(f"{url}/v1/models", timeout=30).json()["loaded"]
        asyncio.run(load(url, buffer.getvalue(), "image/png", 2, 2))  # first requests: not measured
        result = asyncio.run(saturate(url, buffer.getvalue(), budget.http_requests, 2 * batch))
    per_image = 1 / result["images_per_s"]
    return {
        **result, "lr": image.width, "ready_s": ready_s, "served_path": {k: loaded.get(k) for k in
        ("dtype", "autocast", "channels_last", "compile", "threads", "tile_seconds")},
        "model_only_s_per_image": model_seconds,
        "http_overhead_share": per_image / model_seconds - 1 if model_seconds else None,
    }


# -- torch.compile -----------------------------------------------------------------------------------
def compile_part(make: Callable[..., SRPipeline], budget: Budget, backend: str) -> dict[str, Any]:
    """Eager against compiled on the fast path, per tile size, at the batch ``pipe(image)`` runs."""
    eager, compiled = make(), make(compile_mode="default", compile_backend=backend)
    rows = []
    for tile in eager.tile_sizes:
        batch, side = eager.max_tile_batch, tile * eager.latent_scale
        lr, noise = torch.rand(batch, 3, tile, tile) * 2 - 1, torch.randn(batch, eager.latent_channels, side, side)
        started = time.perf_counter()
        compiled.run_tiles(lr, noise)
        compile_s = time.perf_counter() - started
        seconds = side_by_side({"eager": partial(eager.run_tiles, lr, noise),
                                "compiled": partial(compiled.run_tiles, lr, noise)}, budget.timing)
        rows.append({"tile": tile, "batch": batch, "eager_ms": 1e3 * seconds["eager"],
                     "compiled_ms": 1e3 * seconds["compiled"], "speedup": seconds["eager"] / seconds["compiled"],
                     "first_call_s": compile_s})
        print(json.dumps({"compile": rows[-1]}), flush=True)
    pays = all(row["speedup"] >= 1.1 for row in rows)
    return {"backend": backend, "dtype": str(eager.dtype).removeprefix("torch."), "rows": rows,
            "verdict": "pays (≥ 1.1× at every tile size)" if pays else "does not pay: off by default"}


# -- targets and report ------------------------------------------------------------------------------
def targets(report: dict[str, Any]) -> dict[str, Any]:
    """Issue 28's targets, each with the measured value (None when the run did not measure it)."""
    def row(model: str, path: str, lr: int) -> dict[str, Any] | None:
        rows = [r for m in report.get("models", []) for r in m["rows"]
                if r["model"] == model and r["path"] == path and r["lr"] == lr]
        return rows[0] if rows else None

    largest = max(report["sizes"])
    shipped = report.get("model")
    out: dict[str, Any] = {}
    fast, ref = row(shipped, "fast", largest), row(shipped, "float32", largest)
    if fast and ref:
        out["fast_over_float32"] = {"value": fast["images_per_s"] / ref["images_per_s"], "target": ">= 3"}
    full = row(FULL_SIZE, "fast", largest)
    if full:
        out["full_size_pct_of_conv_ceiling"] = {"value": full["ceiling_pct"], "target": ">= 30",
                                                "ceiling_dtype": full["dtype"]}
    esrgan = {r["dtype"]: r for r in report.get("realesrgan", {}).get("rows", []) if r["lr"] == largest}
    if fast and "float32" in esrgan:
        out["time_over_realesrgan_fp32"] = {"value": fast["p50_ms"] / esrgan["float32"]["p50_ms"], "target": "<= 0.5"}
    if fast and "bfloat16" in esrgan:
        out["time_over_realesrgan_bf16"] = {"value": fast["p50_ms"] / esrgan["bfloat16"]["p50_ms"], "target": "<= 1.0"}
    if "http" in report:
        out["http_overhead_share"] = {"value": report["http"]["http_overhead_share"], "target": "<= 0.10"}
        out["healthz_p50_ms"] = {"value": report["http"]["healthz_p50_ms"], "target": "< 50"}
    guards = [db for m in report.get("models", []) for db in m["guard_psnr_db"].values()]
    if guards:
        out["guard_min_psnr_db"] = {"value": min(guards), "target": f">= {GUARD_DB:g}"}
    return out


def markdown(report: dict[str, Any]) -> str:
    """The tables of docs/performance.md's CPU section."""
    env = report["environment"]
    lines = [f"{env['cpu']}, {env['usable_cpus']} usable cores, bf16 units: {env['bf16_units']}, torch {env['torch']}",
             "", f"Command: `{report['command']}`", "", "| kernel | dtype | 1 thread | all threads |", "|---|---|---|---|"]
    for kernel, by_dtype in report.get("ceiling", {}).items():
        for dtype, by_threads in by_dtype.items():
            values = list(by_threads.values())
            lines.append(f"| {kernel} | {dtype} | {values[0]:.1f} GFLOP/s | {values[-1]:.1f} GFLOP/s |")
    lines += ["", "| model | path | LR→SR | tile × n | images/s | p50 ms | GFLOP/img | GFLOP/s | % ceiling |",
              "|---|---|---|---|---|---|---|---|---|"]
    for entry in report.get("models", []):
        for r in entry["rows"]:
            lines.append(f"| {r['model']} | {r['path']} ({r['dtype']}) | {r['lr']}→{r['sr']} | {r['tile']} × {r['tiles']} "
                         f"| {r['images_per_s']:.3f} | {r['p50_ms']:.0f} | {r['gflop_per_image']:.1f} | "
                         f"{r['gflops']:.1f} | {r['ceiling_pct']:.0f} |")
    for r in report.get("realesrgan", {}).get("rows", []):
        lines.append(f"| Real-ESRGAN x4plus | {r['dtype']} | {r['lr']}→{4 * r['lr']} | whole | {r['images_per_s']:.3f} | "
                     f"{r['p50_ms']:.0f} | {r['gflop_per_image']:.1f} | {r['gflops']:.1f} | |")
    lines += ["", "| target | measured | wanted |", "|---|---|---|"]
    for name, target in report["targets"].items():
        value = target["value"]
        lines.append(f"| {name} | {value:.3g} | {target['target']} |" if value is not None else f"| {name} | — | {target['target']} |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="registry reference of the model (the shipped one: vpdsr-small@production)")
    p.add_argument("--registry", type=Path, default=ROOT / "registry")
    p.add_argument("--full-size", action=argparse.BooleanOptionalAction, default=True,
                   help="also the full-size architecture with random weights")
    p.add_argument("--sizes", default="64,128", help="LR sides of the test images")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="photo the test images are cut from")
    p.add_argument("--parts", default=",".join(PARTS), help=", ".join(PARTS))
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile part")
    p.add_argument("--quick", action="store_true", help="short measurements, for development")
    p.add_argument("--out", type=Path, required=True, help="the JSON report")
    p.add_argument("--markdown", type=Path, help="also the tables as Markdown")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = set(args.parts.split(","))
    budget = Budget.of(args.quick)
    sizes = [int(v) for v in args.sizes.split(",")]
    images = lr_images(args.image, sizes)
    threads = sorted({1, usable_cpus()})
    bf16 = cpu_bf16_units()
    report: dict[str, Any] = {
        "command": "python " + " ".join(["benchmarks/bench_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": {"cpu": cpu_name(), "usable_cpus": usable_cpus(), "bf16_units": bf16,
                        "torch": torch.__version__, "python": platform.python_version()},
        "quick": args.quick, "sizes": sizes, "model": args.model,
    }
    def save() -> None:
        """The report so far: a long run on a busy CPU that is stopped keeps the parts it finished."""
        report["targets"] = targets(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    report["ceiling"] = ceiling(budget, threads) if parts & {"ceiling", "models"} else {}
    save()
    conv = report["ceiling"].get("conv3x3", {})
    make_model = partial(build, CPU, args.model, args.registry)
    if "models" in parts:
        report["models"] = []
        if args.model:
            report["models"].append(model_part(args.model, "trained", make_model, images, budget, conv, threads[-1]))
            save()
        if args.full_size:
            make_full = partial(build, CPU, None, None)
            report["models"].append(model_part(FULL_SIZE, "random (seeded)", make_full, images, budget, conv, threads[-1]))
            save()
    if "realesrgan" in parts:
        report["realesrgan"] = realesrgan_part(images, budget, bf16)
        save()
    if "http" in parts and args.model:
        smallest = min(sizes)
        fast_rows = [r for m in report.get("models", []) for r in m["rows"]
                     if r["model"] == args.model and r["path"] == "fast" and r["lr"] == smallest]
        model_seconds = fast_rows[0]["p50_ms"] / 1e3 if fast_rows else None
        report["http"] = http_part(args.model, args.registry, images[smallest], budget, model_seconds)
        save()
    if "compile" in parts and args.model:
        report["compile"] = compile_part(make_model, budget, args.compile_backend)
        save()
    if args.markdown:
        args.markdown.write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
