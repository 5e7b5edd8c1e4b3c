"""The Python parts of ``benchmarks/device_suite.sh``: issue 16's GPU measurements in one lease.

Each part is a subcommand and its own process, so that the shell can stop one that overruns its
budget and go on with the next. A part writes ``WORK/<part>.json`` after every measurement and
records what failed or was skipped instead of stopping, so what it measured before a failure or
its deadline survives; ``merge`` turns the parts into ``gpu.json`` (:data:`SCHEMA`) and ``gpu.md``.

    prepare  the environment, and registries: the full-size architecture with random weights as
             ``student`` (tile buckets 64 and 128), ``served`` (bucket 64 only: the HTTP part
             sends 64² images, so the server compiles two graphs, not four) and ``teacher`` (15 steps)
    http     ``vpdsr serve`` started twice on one fresh compile cache: ready time cold, then warm;
             p50 of sequential 64→256 requests, images/s with 32 concurrent clients
    train    one VPD-SR distillation step at batch 16 (benchmarks/bench_train.py)
    model    bf16 against fp32 on a photo; bench_model.py's paths optimised, eager-bf16, eager-fp32
             (most wanted first: a part cut short loses the reference rows) × 64→256, 128→512 ×
             batches 1…64; the 2048² input through the tiled pipeline. It reuses the http part's
             compile cache, so the 64-pixel graphs are not compiled twice.
    merge    gpu.json + gpu.md

``--tiny`` runs the same code with the tests' tiny models and sizes on the CPU in seconds
(tests/test_device_suite.py), so the suite cannot rot between device sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

import bench_model
import bench_service
from model.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "tests" / "fixtures" / "realset" / "bag1.jpeg"  # bf16 error on a photo, not on noise
TRAINED = "vpdsr-small@production"  # the repo's trained model: rounding as trained weights see it
PARTS = ("prepare", "http", "train", "model")
T = TypeVar("T")

# Issue 16's gpu.json: types of the required keys (a list holds one example element). Added keys are allowed.
SCHEMA: dict[str, Any] = {
    "gpu": str,
    "driver": str,
    "torch": str,
    "command": str,
    "model": [
        {"path": str, "lr": int, "batch": int, "images_per_s": float, "p50_ms": float, "p95_ms": float,
         "peak_mem_gib": float, "tflops": float}
    ],
    "large": {"side": int, "seconds": float, "peak_mem_gib": float},
    "bf16_rel_err": float,
    "http": {"p50_ms_one_64": float, "images_per_s_32_clients": float},
    "train": {"batch": int, "step_s": float, "peak_mem_gib": float},
    "ready_s": {"cold": float, "warm_cache": float},
}


@dataclass(frozen=True)
class Sizes:
    """What the suite measures: :data:`FULL` is issue 16's list, :data:`TINY` the same in seconds on a CPU."""

    resolutions: tuple[int, ...]  # LR tile sizes of the model rows
    batches: tuple[int, ...]
    large_side: int
    served_tiles: tuple[int, ...]  # tile buckets of the full-size served model
    http_side: int  # the HTTP requests' image: one tile
    sequential_requests: int
    concurrent_requests: int
    clients: int
    max_batch_size: int  # VPDSR_MAX_BATCH_SIZE of the server
    train_preset: str
    train_sets: tuple[str, ...]
    train_steps: int
    iters: int  # timed calls per model row, at most
    row_seconds: float  # ... or fewer once a row has taken this long (three at least)


FULL = Sizes(
    resolutions=(64, 128), batches=(1, 2, 4, 8, 16, 32, 64), large_side=2048, served_tiles=(64,), http_side=64,
    sequential_requests=40, concurrent_requests=640, clients=32, max_batch_size=32, train_preset="distill-vpdsr",
    train_sets=(), train_steps=5, iters=20, row_seconds=1.5,
)
TINY = Sizes(
    resolutions=(16, 32), batches=(1, 2), large_side=40, served_tiles=(), http_side=16, sequential_requests=3,
    concurrent_requests=32, clients=32, max_batch_size=4, train_preset="distill-small",
    train_sets=("data.batch_size=2",), train_steps=2, iters=2, row_seconds=0.5,
)


class PartLog:
    """One part's results in ``WORK/<part>.json``, rewritten after every measurement, with the
    errors that did not stop it and a deadline after which it starts nothing new."""

    def __init__(self, work: Path, part: str, budget_s: float) -> None:
        self.path = work / f"{part}.json"
        self.data: dict[str, Any] = {"errors": []}
        self.started = time.monotonic()
        self.deadline = self.started + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def set(self, key: str, value: object) -> None:
        self.data[key] = value
        self.save()

    def append(self, key: str, value: object) -> None:
        self.data.setdefault(key, []).append(value)
        self.save()

    def error(self, what: str, message: str) -> None:
        print(f"[{self.path.stem}] {what}: {message}", file=sys.stderr, flush=True)
        self.append("errors", f"{what}: {message}")

    def save(self) -> None:
        self.data["seconds"] = round(time.monotonic() - self.started, 1)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")

    def attempt(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None with the error recorded: one failed measurement must not cost the
        others. Past the deadline it is skipped (and recorded) instead."""
        if self.left() <= 0:
            self.error(what, "skipped: the part's time budget is spent")
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - recorded in the results, the suite goes on
            self.error(what, f"{type(exc).__name__}: {exc}")
            return None


# -- prepare ----------------------------------------------------------------------------------------
def tiny_clip_sets(work: Path) -> tuple[str, ...]:
    """``--set`` items selecting the tests' one-layer CLIP with random weights (its config is written to ``work``)."""
    from tests.test_train_distill import TINY_CLIP

    path = work / "vpdsr-suite-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return (f"clip.model_config_path={path}", f"clip.model_name={path.stem}")


def prepare(log: PartLog, sizes: Sizes, tiny: bool, work: Path) -> None:
    """The environment, and the registry the other parts load their models from."""
    log.set("environment", bench_model.environment(resolve_device("auto")))
    registry = work / "registry"
    if tiny:
        from tests.conftest import save_tiny_model

        save_tiny_model(registry, name="student")
        save_tiny_model(registry, name="served")
        save_tiny_model(registry, name="teacher", kind="teacher", inference_steps=15)
    else:
        bench_service.save_random_model(registry, "student")
        bench_service.save_random_model(registry, "served", tile_sizes=sizes.served_tiles)
        bench_service.save_random_model(registry, "teacher", kind="teacher", inference_steps=15)
    log.set("registry", str(registry))


# -- http -------------------------------------------------------------------------------------------
def compile_cache(work: Path) -> dict[str, str]:
    """Inductor's cache (FX graphs, autotuning, Triton kernels): shared by the http and model parts."""
    cache = work / "compile-cache"
    return {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}


def p50_ms(results: list[tuple[float, int]]) -> float:
    ok = [seconds for seconds, status in results if status == 200]
    if not ok:
        raise RuntimeError(f"no request succeeded: statuses {sorted({status for _, status in results})}")
    return 1e3 * bench_model.percentile(ok, 0.5)


def http(log: PartLog, sizes: Sizes, work: Path, compile_mode: str) -> None:
    """Two starts of the same server on one fresh compile cache (cold, then warm), then the load."""
    settings = {
        "VPDSR_DEVICE": "auto", "VPDSR_DTYPE": "auto", "VPDSR_CHANNELS_LAST": "auto", "VPDSR_COMPILE": compile_mode,
        "VPDSR_MAX_BATCH_SIZE": str(sizes.max_batch_size), "VPDSR_LOG_LEVEL": "info",
    }
    log.set("settings", settings)
    shutil.rmtree(work / "compile-cache", ignore_errors=True)
    env = settings | compile_cache(work)

    def server() -> AbstractContextManager[tuple[str, float]]:
        registry, log_file = work / "registry", work / "server.log"
        return bench_service.serve_process(registry, "served@production", env, log=log_file, timeout=max(1.0, log.left()))

    with server() as (_, cold_s):
        log.set("ready_cold_s", cold_s)
    with server() as (url, warm_s):
        log.set("ready_warm_s", warm_s)
        body, media_type = bench_service.image_bytes(bench_service.DEFAULT_IMAGE, f"{sizes.http_side}x{sizes.http_side}")

        def send(total: int, clients: int) -> list[tuple[float, int]]:
            return asyncio.run(bench_service.load(url, body, media_type, total, clients))

        send(3, 1)  # connections, first JPEG codec calls
        log.attempt("sequential requests", lambda: log.set("p50_ms_one", p50_ms(send(sizes.sequential_requests, 1))))

        def concurrent() -> None:
            before = bench_service.scrape(url)
            started = time.perf_counter()
            results = send(sizes.concurrent_requests, sizes.clients)
            wall = time.perf_counter() - started
            after = bench_service.scrape(url)
            batches = after["vpdsr_batch_size_count"] - before.get("vpdsr_batch_size_count", 0.0)
            log.set("concurrent", {
                "clients": sizes.clients,
                "requests": len(results),
                "ok": sum(status == 200 for _, status in results),
                "images_per_s": sum(status == 200 for _, status in results) / wall,
                "p50_ms": p50_ms(results),
                "mean_batch": (after["vpdsr_batch_size_sum"] - before.get("vpdsr_batch_size_sum", 0.0)) / max(batches, 1),
            })

        log.attempt("concurrent requests", concurrent)


# -- train ------------------------------------------------------------------------------------------
def train(log: PartLog, sizes: Sizes, tiny: bool, work: Path) -> None:
    import bench_train  # here: its imports (open_clip, pytorch_wavelets) must not break the other parts

    sets = sizes.train_sets + (tiny_clip_sets(work) if tiny else ())
    cfg = bench_train.distill_config(sizes.train_preset, "teacher@production", "auto", work / "train-run", sets)
    log.set("train", bench_train.time_steps(cfg, work / "registry", steps=sizes.train_steps, warmup=1 if tiny else 2))


# -- model ------------------------------------------------------------------------------------------
def schema_row(row: bench_model.Row) -> dict[str, object]:
    """A bench_model row under gpu.json's names (``lr``, ``tflops``), its other fields kept."""
    return {"path": row.path, "lr": row.resolution, "batch": row.batch, "images_per_s": row.images_per_s,
            "p50_ms": row.p50_ms, "p95_ms": row.p95_ms, "peak_mem_gib": row.peak_mem_gib, "tflops": row.achieved_tflops,
            "p99_ms": row.p99_ms, "tflop_per_image": row.tflop_per_image, "floor_ms_per_image": row.floor_ms_per_image}


def release(device: torch.device) -> None:
    """Give dropped pipelines' memory back, so that the next path's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_rows(log: PartLog, pipe: Any, label: str, sizes: Sizes, flops: dict[int, float]) -> None:
    """Every (resolution, batch) row of one path; a compiled path warms each shape up three times
    (compile, CUDA graph warm-up, recording) before it is timed. A path whose first row fails is
    given up: its other rows would most likely fail the same way, each after a compilation."""
    timing = bench_model.Timing(iters=sizes.iters, warmup=3 if pipe.compiled else 1, max_seconds=sizes.row_seconds)
    shapes = [(res, batch) for res in sizes.resolutions for batch in sizes.batches]
    for index, (res, batch) in enumerate(shapes):
        if log.left() <= 0:
            log.error(label, f"{len(shapes) - index} rows skipped: the part's time budget is spent")
            return
        row = log.attempt(f"{label} {res}px batch {batch}",
                          lambda: bench_model.bench(pipe, label, res, batch, 1, flops[res], timing))  # noqa: B023
        if row is None and index == 0:
            log.error(label, "given up after its first row failed")
            return
        if row is not None:
            print(json.dumps(schema_row(row)), flush=True)
            log.append("rows", schema_row(row))


def model(log: PartLog, sizes: Sizes, work: Path, compile_mode: str) -> None:
    """bf16 errors first (cheap, and the optimised path's first compile), then the rows, most
    wanted first; one pipeline on the device at a time, so each row's peak memory is its own."""
    os.environ.update(compile_cache(work))
    device = resolve_device("auto")
    mode = None if compile_mode == "off" else compile_mode

    def build(label: str, ref: str = "student@production", registry: Path = work / "registry") -> Any:
        return bench_model.build(device, ref, registry, **bench_model.path_options(label, device, mode))

    side = max(sizes.resolutions)
    photo = Image.open(PHOTO).convert("RGB").crop((0, 0, side, side))
    reference = build("eager-fp32")

    def relative_error(candidate: Any) -> float:
        return bench_model.relative_error(reference, candidate, photo)

    flops = {res: bench_model.count_flops(reference, res, 1) for res in sizes.resolutions}
    log.set("flop_per_image", {str(res): value for res, value in flops.items()})
    log.attempt("bf16 error, eager", lambda: log.set("bf16_rel_err_eager", relative_error(build("eager-bf16"))))
    optimised = log.attempt("build optimised", lambda: build("optimised"))
    if optimised is not None:
        log.attempt("bf16 error", lambda: log.set("bf16_rel_err", relative_error(optimised)))

    def trained_error() -> None:
        pair = [build(label, TRAINED, ROOT / "registry") for label in ("eager-fp32", "eager-bf16")]
        log.set("bf16_rel_err_trained", {"model": TRAINED, "eager_bf16": bench_model.relative_error(*pair, photo)})

    log.attempt("bf16 error, trained model", trained_error)
    del reference
    release(device)

    if optimised is not None:
        measure_rows(log, optimised, "optimised", sizes, flops)
        log.attempt("large input", lambda: log.set("large", bench_model.large_image(optimised, sizes.large_side)))
        del optimised
        torch._dynamo.reset()  # its compiled graphs and CUDA graph pools
        release(device)
    for label in ("eager-bf16", "eager-fp32"):
        pipe = log.attempt(f"build {label}", lambda: build(label))  # noqa: B023
        if pipe is not None:
            measure_rows(log, pipe, label, sizes, flops)
            del pipe
            release(device)


# -- merge ------------------------------------------------------------------------------------------
def schema_problems(doc: object, schema: object = SCHEMA, where: str = "gpu.json") -> list[str]:
    """What in ``doc`` breaks :data:`SCHEMA` (missing keys, wrong types, NaN); empty when it fits."""
    if isinstance(schema, dict):
        if not isinstance(doc, dict):
            return [f"{where}: expected an object, got {doc!r}"]
        return [p for key, sub in schema.items()
                for p in (schema_problems(doc[key], sub, f"{where}.{key}") if key in doc else [f"{where}.{key}: missing"])]
    if isinstance(schema, list):
        if not isinstance(doc, list) or not doc:
            return [f"{where}: expected a non-empty list, got {doc!r}"]
        return [p for i, item in enumerate(doc) for p in schema_problems(item, schema[0], f"{where}[{i}]")]
    if schema is float:
        ok = isinstance(doc, (int, float)) and not isinstance(doc, bool) and math.isfinite(doc)
    else:
        ok = isinstance(doc, schema) and not isinstance(doc, bool)  # type: ignore[arg-type]
    return [] if ok else [f"{where}: expected {schema.__name__}, got {doc!r}"]  # type: ignore[union-attr]


def read_parts(work: Path) -> dict[str, dict[str, Any]]:
    parts = {}
    for name in PARTS:
        path = work / f"{name}.json"
        parts[name] = json.loads(path.read_text()) if path.exists() else {"errors": ["the part wrote nothing"]}
    return parts


def merge(work: Path, command: str, compile_mode: str, tiny: bool) -> dict[str, Any]:
    """gpu.json from the parts: the issue's keys (None where a part failed), then the details."""
    sizes = TINY if tiny else FULL
    parts = read_parts(work)
    env = parts["prepare"].get("environment", {})
    measured, served, trained = parts["model"], parts["http"], parts["train"].get("train", {})
    large = measured.get("large", {})
    concurrent = served.get("concurrent", {})
    return {
        "gpu": env.get("device"),
        "driver": env.get("driver"),
        "torch": env.get("torch"),
        "command": command,
        "model": measured.get("rows", []),
        "large": {"side": sizes.large_side, "seconds": large.get("seconds"), "peak_mem_gib": large.get("peak_mem_gib")},
        "bf16_rel_err": measured.get("bf16_rel_err"),
        "http": {"p50_ms_one_64": served.get("p50_ms_one"), "images_per_s_32_clients": concurrent.get("images_per_s")},
        "train": {key: trained.get(key) for key in ("batch", "step_s", "peak_mem_gib")},
        "ready_s": {"cold": served.get("ready_cold_s"), "warm_cache": served.get("ready_warm_s")},
        "cuda": env.get("cuda"),
        "python": env.get("python"),
        "compile_mode": compile_mode,
        "tiny": tiny,
        "bf16_rel_err_eager": measured.get("bf16_rel_err_eager"),
        "bf16_rel_err_trained": measured.get("bf16_rel_err_trained"),
        "flop_per_image": measured.get("flop_per_image"),
        "http_detail": {"side": sizes.http_side, "settings": served.get("settings"), "concurrent": concurrent},
        "train_detail": trained,
        "errors": {name: part["errors"] for name, part in parts.items() if part.get("errors")},
        "part_seconds": {name: part.get("seconds") for name, part in parts.items()},
    }


def _fmt(value: object) -> str:
    """Three significant digits for a measurement, a dash for one that is missing."""
    return "—" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(doc: dict[str, Any]) -> str:
    """gpu.md: the model rows, then every other measurement beside its target from issue 16."""
    lines = [
        f"# Device suite: {doc['gpu']}",
        "",
        f"Driver {doc['driver']}, torch {doc['torch']}, CUDA {doc['cuda']}, Python {doc['python']}; "
        f"compile mode `{doc['compile_mode']}`. Command: `{doc['command']}`",
        "",
        "| path | LR → SR | batch | images/s | p50 ms | p95 ms | peak GiB | TFLOP/s | % of 790 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["model"]:
        lines.append(
            f"| {r['path']} | {r['lr']} → {4 * r['lr']} | {r['batch']} | {r['images_per_s']:.1f} | {r['p50_ms']:.2f} | "
            f"{r['p95_ms']:.2f} | {r['peak_mem_gib']:.2f} | {r['tflops']:.1f} | "
            f"{100 * r['tflops'] / bench_model.PEAK_BF16_TFLOPS:.1f} |"
        )
    optimised = [r for r in doc["model"] if r["path"] == "optimised"]
    resolutions = sorted({r["lr"] for r in doc["model"]}) or [64, 128]
    small, big = resolutions[0], resolutions[-1]
    best = max((r["images_per_s"] for r in optimised if r["lr"] == small), default=None)
    one = {r["lr"]: r["p50_ms"] for r in optimised if r["batch"] == 1}
    trained = (doc.get("bf16_rel_err_trained") or {}).get("eager_bf16")
    side, http_side = doc["large"]["side"], doc["http_detail"]["side"]
    clients = doc["http_detail"]["concurrent"].get("clients", 32)
    measures = [
        (f"{small}→{4 * small} batched, model only: images/s", best, "≥ 350"),
        (f"one {small}→{4 * small} image, model only: p50 ms", one.get(small), "≤ 10"),
        (f"one {big}→{4 * big} image, model only: p50 ms", one.get(big), "≤ 25"),
        (f"{side}² input tiled: seconds", doc["large"]["seconds"], ""),
        (f"{side}² input tiled: peak GiB", doc["large"]["peak_mem_gib"], "≤ 10"),
        ("bf16 relative error, optimised vs fp32 (random weights)", doc["bf16_rel_err"], "≤ 1e-2"),
        ("bf16 relative error, eager vs fp32 (random weights)", doc.get("bf16_rel_err_eager"), ""),
        (f"bf16 relative error, eager vs fp32 ({TRAINED}, trained)", trained, "≤ 1e-2"),
        (f"HTTP, one {http_side}→{4 * http_side} request at a time: p50 ms", doc["http"]["p50_ms_one_64"], "≤ 25"),
        (f"HTTP, {clients} clients: images/s", doc["http"]["images_per_s_32_clients"], ""),
        (f"distillation step, batch {doc['train']['batch']}: seconds", doc["train"]["step_s"], "≤ 1.0"),
        ("distillation step: peak GiB", doc["train"]["peak_mem_gib"], ""),
        ("ready time, cold compile cache: s", doc["ready_s"]["cold"], ""),
        ("ready time, warm compile cache: s", doc["ready_s"]["warm_cache"], ""),
    ]
    lines += ["", "| measure | value | target |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(value)} | {target} |" for name, value, target in measures]
    if doc["errors"]:
        lines += ["", "Errors and skipped measurements:", ""]
        lines += [f"- {part}: {message}" for part, messages in doc["errors"].items() for message in messages]
    return "\n".join(lines) + "\n"


# -- command line -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=(*PARTS, "merge"))
    parser.add_argument("--work", type=Path, required=True, help="scratch folder shared by the parts")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes, for a CPU")
    parser.add_argument("--compile", default="reduce-overhead", help="VPDSR_COMPILE of the server and the optimised path")
    parser.add_argument("--budget", type=float, default=600, help="seconds after which the part starts nothing new")
    parser.add_argument("--out", type=Path, help="merge: folder for gpu.json and gpu.md")
    parser.add_argument("--command", default="bash benchmarks/device_suite.sh", help="merge: the command to record")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part == "merge":
        doc = merge(args.work, args.command, args.compile, args.tiny)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "gpu.md").write_text(markdown(doc))
        for problem in schema_problems(doc):
            print(f"schema: {problem}", file=sys.stderr)
        return 0
    log = PartLog(args.work, args.part, args.budget)
    runs: dict[str, Callable[[], None]] = {
        "prepare": lambda: prepare(log, sizes, args.tiny, args.work),
        "http": lambda: http(log, sizes, args.work, args.compile),
        "train": lambda: train(log, sizes, args.tiny, args.work),
        "model": lambda: model(log, sizes, args.work, args.compile),
    }
    try:
        log.attempt(args.part, runs[args.part])
    except KeyboardInterrupt:  # the shell's timeout: keep what was measured
        log.error(args.part, "stopped at its time limit")
    log.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
