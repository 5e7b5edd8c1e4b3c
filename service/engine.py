"""The warmed model behind a dynamic batcher: the one entry point for every upscale.

Synchronous HTTP requests and background jobs both call :meth:`Engine.upscale`. A request is cut
into tiles (:meth:`SRPipeline.plan`), its tiles wait in the :class:`~service.batcher.Batcher`
with those of other requests, batches run on one dedicated model thread (the event loop never
blocks, so health checks and metrics answer under load), and the request's SR tiles are put
back together (:meth:`TilePlan.assemble`).

Guarantees:

- bounded queue: a request that would push more than ``max_queue`` tiles into the queue is
  refused at once (:class:`QueueFull`, 429 with ``Retry-After``); background work may use only
  half of the queue, so jobs never crowd out interactive clients;
- bounded wait: past its deadline a request gives up — 503 (:class:`QueueTimeout`) if none of
  its tiles started, 504 (:class:`ComputeTimeout`) otherwise — and its waiting tiles are dropped;
- a cancelled request (client gone) has its waiting tiles dropped before they cost compute;
- isolation: if a batch fails, its requests are retried one by one, so only the request that
  breaks the model fails.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

import torch
from PIL import Image
from torch import Tensor

from model import Registry, SRPipeline
from model.device import resolve_device, resolve_dtype
from model.pipeline import Tile, TilePlan

from .batcher import Batch, Batcher, BatchKey, Priority, warm_batch_sizes
from .errors import (
    ComputeFailed,
    ComputeOutOfMemory,
    ComputeTimeout,
    InvalidParameters,
    ModelNotLoaded,
    NotReady,
    QueueFull,
    QueueTimeout,
    ServiceError,
)
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("vpdsr.service")

SEED_LIMIT = 2**53  # random seeds stay exact in JSON / JavaScript numbers
_EWMA = 0.2  # weight of the newest batch in the seconds-per-tile estimate


class EngineState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class UpscaleOptions:
    """Per-request inference options; None = the model's default."""

    steps: int | None = None
    seed: int | None = None
    tile: int | None = None  # one of the pipeline's tile sizes
    scale: int | None = None  # 2..model scale; below the model's, the result is Lanczos-resized


@dataclass(frozen=True)
class UpscaleResult:
    image: Image.Image
    seed: int
    steps: int
    queue_seconds: float  # admission → first tile starts computing
    compute_seconds: float  # first tile starts → image assembled
    model: str
    version: str


@dataclass(eq=False)
class _Work:
    """One upscale inside the engine: its tiles, their outputs, and the future the caller awaits."""

    key: BatchKey
    priority: Priority
    enqueued_at: float
    tiles: list[Tile]
    future: asyncio.Future[list[Tensor]]
    outputs: list[Tensor | None] = field(init=False)
    pending: int = field(init=False)
    started_at: float | None = None

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.tiles)
        self.pending = len(self.tiles)


def load_pipeline(settings: Settings) -> SRPipeline:
    return SRPipeline.from_registry(
        settings.model,
        Registry(settings.registry),
        device=resolve_device(settings.device),
        dtype=resolve_dtype(settings.dtype),
    )


class Engine:
    """Owns the model, its thread and the batcher. ``start()`` before use, ``stop()`` after."""

    def __init__(
        self, settings: Settings, metrics: Metrics, load: Callable[[], SRPipeline] | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.batch_sizes = warm_batch_sizes(settings.max_batch_size)
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.pipeline: SRPipeline | None = None
        self._load = load or (lambda: load_pipeline(settings))
        self._batcher: Batcher[_Work] = Batcher(self.batch_sizes, settings.max_delay_ms / 1000)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vpdsr-model")
        self._wake = asyncio.Event()
        self._works: set[_Work] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._tile_seconds = 1.0  # model seconds per tile, refined by every batch (Retry-After)
        metrics.queue_depth.set_function(lambda: self._batcher.depth)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm the model on the model thread, then start batching; raises on failure."""
        loop = asyncio.get_running_loop()
        try:
            pipe = await loop.run_in_executor(self._executor, self._load)
            started = time.perf_counter()
            await loop.run_in_executor(self._executor, pipe.warmup, self.batch_sizes)
            warm_seconds = time.perf_counter() - started
        except Exception as exc:
            self.state, self.error = EngineState.FAILED, f"{type(exc).__name__}: {exc}"
            raise
        if self.state is EngineState.STOPPED:
            return
        self._tile_seconds = warm_seconds / (len(pipe.tile_sizes) * sum(self.batch_sizes))
        self.pipeline = pipe
        self.metrics.set_model(pipe.name, pipe.version, pipe.device, pipe.dtype)
        self._scheduler = asyncio.create_task(self._schedule(), name="vpdsr-batcher")
        self.state = EngineState.READY
        log.info(
            "serving %s:%s on %s (%s); warmed tiles %s × batches %s in %.1f s",
            pipe.name, pipe.version, pipe.device, pipe.dtype, pipe.tile_sizes, self.batch_sizes, warm_seconds,
        )

    async def stop(self) -> None:
        """Stop batching and fail whatever is still waiting (the server is going away)."""
        self.state = EngineState.STOPPED
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        for work in list(self._works):
            self._fail(work, NotReady("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- requests --------------------------------------------------------------------------------
    def ready_pipeline(self) -> SRPipeline:
        if self.state is not EngineState.READY or self.pipeline is None:
            detail = f": {self.error}" if self.error else ""
            raise NotReady(f"model {self.settings.model} is {self.state.value}{detail}")
        return self.pipeline

    def check_model(self, ref: str | None) -> None:
        """Only the loaded model is served: another existing model is a 409, an unknown one 404."""
        pipe = self.ready_pipeline()
        if ref is None:
            return
        entry = Registry(self.settings.registry).resolve(ref)
        if (entry.name, entry.version) != (pipe.name, pipe.version):
            raise ModelNotLoaded(
                f"{ref!r} is {entry.ref}, but this server serves {pipe.name}:{pipe.version}; "
                "omit 'model' or send the request to a server of that model"
            )

    def resolve_options(self, options: UpscaleOptions) -> tuple[SRPipeline, int, int]:
        """(pipeline, steps, scale) for these options, or the 422 that the loaded model gives them."""
        pipe = self.ready_pipeline()
        steps = pipe.check_steps(options.steps)
        scale = pipe.scale if options.scale is None else options.scale
        if not 2 <= scale <= pipe.scale:
            raise InvalidParameters(f"scale must be between 2 and {pipe.scale}, got {scale}")
        if options.tile is not None and options.tile not in pipe.tile_sizes:
            raise InvalidParameters(f"tile must be one of {list(pipe.tile_sizes)} (the warmed tile sizes), got {options.tile}")
        return pipe, steps, scale

    def retry_after(self) -> float:
        """Seconds until the tiles waiting now should be done: the back-off to suggest."""
        return self._batcher.depth * self._tile_seconds

    async def upscale(
        self,
        image: Image.Image,
        options: UpscaleOptions = UpscaleOptions(),
        *,
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
    ) -> UpscaleResult:
        """Upscale one image; ``deadline`` is a ``time.monotonic()`` value (None: no limit)."""
        pipe, steps, scale = self.resolve_options(options)
        seed = random.randrange(SEED_LIMIT) if options.seed is None else options.seed
        self._admit(1, priority)  # cheap early refusal before planning when clearly full
        plan = await asyncio.to_thread(pipe.plan, image, seed, options.tile)
        self._admit(len(plan.tiles), priority)

        loop = asyncio.get_running_loop()
        work = _Work((plan.tile_size, steps), priority, time.monotonic(), plan.tiles, loop.create_future())
        self._batcher.add(work, len(work.tiles))
        self._works.add(work)
        self._wake.set()
        try:
            async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                outputs = await work.future
        except TimeoutError:
            if work.started_at is None:
                raise QueueTimeout("the request could not start before its timeout", self.retry_after()) from None
            raise ComputeTimeout("the request did not finish before its timeout") from None
        finally:
            self._batcher.discard(work)
            self._works.discard(work)
        assert work.started_at is not None
        result = await asyncio.to_thread(_finish, plan, outputs, scale)
        queue_seconds = work.started_at - work.enqueued_at
        compute_seconds = time.monotonic() - work.started_at
        self.metrics.queue_wait.observe(queue_seconds)
        self.metrics.compute.observe(compute_seconds)
        return UpscaleResult(result, seed, steps, queue_seconds, compute_seconds, pipe.name, pipe.version)

    def _admit(self, tiles: int, priority: Priority) -> None:
        limit = self.settings.max_queue if priority is Priority.INTERACTIVE else max(1, self.settings.max_queue // 2)
        depth = self._batcher.depth
        # An image larger than the whole queue still gets in when the queue is empty.
        if depth and depth + tiles > limit:
            raise QueueFull(
                f"queue full: {depth} tiles waiting, this image needs {tiles} (limit {limit}); retry later",
                self.retry_after(),
            )

    # -- the batching loop (event loop) and the model thread -------------------------------------
    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            batch = self._batcher.pop(time.monotonic())
            if batch is None:
                try:
                    async with asyncio.timeout(self._batcher.wait_time(time.monotonic())):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            try:
                await self._run(batch)
            except Exception as exc:  # a bug, not a model error: fail the batch, keep batching
                log.exception("batch failed outside the model")
                for work, _ in batch.entries:
                    self._fail(work, exc)

    async def _run(self, batch: Batch[_Work]) -> None:
        entries = [(work, i) for work, i in batch.entries if not work.future.done()]  # cancelled meanwhile
        if not entries:
            return
        now = time.monotonic()
        for work, _ in entries:
            work.started_at = work.started_at or now
        steps = batch.key[1]
        try:
            outputs = await self._compute(entries, steps)
        except Exception as exc:
            await self._isolate(entries, steps, exc)
        else:
            self._deliver(entries, outputs)

    async def _compute(self, entries: list[tuple[_Work, int]], steps: int) -> Tensor:
        pipe = self.ready_pipeline()

        def run() -> tuple[Tensor, float]:
            started = time.perf_counter()
            lr = torch.stack([work.tiles[i].lr for work, i in entries])
            noise = torch.stack([work.tiles[i].noise for work, i in entries])
            return pipe.run_tiles(lr, noise, steps), time.perf_counter() - started

        outputs, seconds = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        self._tile_seconds += _EWMA * (seconds / len(entries) - self._tile_seconds)
        self.metrics.batch_size.observe(len(entries))
        self.metrics.tiles.inc(len(entries))
        return outputs

    async def _isolate(self, entries: list[tuple[_Work, int]], steps: int, exc: Exception) -> None:
        """A batch failed: retry each request's tiles alone so that only the culprit fails."""
        by_work: dict[_Work, list[tuple[_Work, int]]] = {}
        for entry in entries:
            by_work.setdefault(entry[0], []).append(entry)
        if len(by_work) == 1:
            self._fail(entries[0][0], exc)
            return
        for work, own in by_work.items():
            try:
                self._deliver(own, await self._compute(own, steps))
            except Exception as own_exc:
                self._fail(work, own_exc)

    def _deliver(self, entries: list[tuple[_Work, int]], outputs: Tensor) -> None:
        for (work, i), output in zip(entries, outputs, strict=True):
            if work.future.done():
                continue
            work.outputs[i] = output
            work.pending -= 1
            if work.pending == 0:
                work.future.set_result([o for o in work.outputs if o is not None])

    def _fail(self, work: _Work, exc: Exception) -> None:
        if work.future.done():
            return
        if not isinstance(exc, ServiceError):
            log.error("model failed on a request", exc_info=exc)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                exc = ComputeOutOfMemory("out of memory on the model device; retry later", self.retry_after())
            else:
                exc = ComputeFailed(f"the model failed on this image: {type(exc).__name__}")
        work.future.set_exception(exc)


def _finish(plan: TilePlan, outputs: list[Tensor], scale: int) -> Image.Image:
    """SR tiles → image, Lanczos-resized when a smaller scale than the model's was asked for."""
    image = plan.assemble(outputs)
    if scale != plan.scale:
        image = image.resize((plan.width * scale, plan.height * scale), Image.Resampling.LANCZOS)
    return image
