"""The warmed model behind a dynamic batcher: the one entry point for every upscale.

Synchronous HTTP requests and background jobs both call :meth:`InferenceEngine.upscale` (through
:func:`service.upscale.run_upscale`), which checks the options, the model reference included. A
request is cut into tiles (:meth:`SRPipeline.plan`), its tiles wait in the
:class:`~service.batcher.Batcher` with those of other requests, batches run on one dedicated
model thread (the event loop never blocks, so health checks and metrics answer under load), and
the request's SR tiles are put back together (:meth:`TilePlan.assemble`).

Admission is by cost, decided from the image size alone before any pixel is planned:

- the engine knows the seconds per tile of each tile bucket (timed at warm-up, then an EWMA of
  every batch), so it estimates a request's compute as tiles × seconds per tile;
- an interactive request that could not finish within ``request_timeout_s`` even on an idle
  server, or that has more tiles than ``max_queue``, is refused at once: 413
  (:class:`TooLargeForSync`), pointing to ``/v1/jobs`` when Redis is configured;
- one that could finish, but not behind the interactive tiles already waiting, gets 429
  (:class:`TileQueueFull`) with a ``Retry-After`` from the estimate, never above the timeout;
- background work (jobs) is never refused for being busy: its tiles enter the batcher in chunks
  while the background share of the queue (half of ``max_queue``) has room, so an image of any
  size within the pixel limits completes, and the wait is not bounded by a deadline. Interactive
  tiles always run first. :meth:`InferenceEngine.background_ready` lets a job consumer take a job
  only when there is room for it.

Other guarantees:

- bounded wait: past its deadline an interactive request gives up — 503 (:class:`QueueTimeout`)
  if none of its tiles started, 504 (:class:`ComputeTimeout`) otherwise — and its waiting tiles
  are dropped; a cancelled request (client gone) has its waiting tiles dropped before they cost
  compute;
- isolation: if a batch fails, its requests are retried one by one, so only the request that
  breaks the model fails.
- batching: a tile's result does not depend on which other tiles share its batch beyond
  floating-point reassociation in the kernels, i.e. at most 1 level in 255 per pixel (see
  docs/service.md, "Reproducibility").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

import torch
from PIL import Image
from torch import Tensor

from model import Registry, SRPipeline
from model.device import resolve_channels_last, resolve_device, resolve_dtype
from model.pipeline import Tile, TilePlan
from model.seeds import resolve_seed

from .batcher import Batch, Batcher, BatchKey, Priority, warm_batch_sizes
from .errors import (
    ComputeFailed,
    ComputeOutOfMemory,
    ComputeTimeout,
    InvalidParameters,
    ModelNotLoaded,
    NotReady,
    QueueTimeout,
    ServiceError,
    TileQueueFull,
    TooLargeForSync,
)
from .prometheus import Metrics
from .schemas import CheckResult
from .settings import Settings

log = logging.getLogger("vpdsr.service")

_EWMA = 0.2  # weight of the newest batch in the seconds-per-tile estimate


Progress = Callable[[int, int], None]
"""(tiles done, tiles in total) of one image, reported after each batch that held its tiles."""


class EngineState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class UpscaleOptions:
    """Per-request inference options; None = the model's default (the seed: a random one)."""

    model: str | None = None  # a registry reference that must resolve to the loaded model
    steps: int | None = None
    seed: int | None = None
    tile: int | None = None  # one of the pipeline's tile sizes
    scale: int | None = None  # 2..model scale; below the model's, the result is Lanczos-resized


@dataclass(frozen=True)
class Resolved:
    """Options checked against the loaded model, defaults filled in."""

    pipe: SRPipeline
    steps: int
    seed: int
    tile: int | None  # None: chosen per image by the pipeline's layout
    scale: int


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
    waiting: int = 0  # tiles in the batcher now
    started_at: float | None = None
    progress: Progress | None = None

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.tiles)
        self.pending = len(self.tiles)


def load_pipeline(settings: Settings) -> SRPipeline:
    """The served model on the path the settings choose. ``auto`` dtype and channels-last follow the
    device, so one configuration serves fast on a GPU and exactly on a CPU; a compiled model
    compiles during :meth:`SRPipeline.warmup`, before ``/readyz`` turns ready."""
    device = resolve_device(settings.device)
    return SRPipeline.from_registry(
        settings.model,
        Registry(settings.registry),
        device=device,
        dtype=resolve_dtype(settings.dtype, device),
        channels_last=resolve_channels_last(settings.channels_last, device),
        compile_mode=None if settings.compile == "off" else settings.compile,
    )


class InferenceEngine:
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
        self._room = asyncio.Condition()  # notified whenever tiles leave the batcher
        self._works: set[_Work] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._tile_seconds: dict[BatchKey, float] = {}  # timed at warm-up, then an EWMA of every batch
        self._planning = (0, 0.0)  # (tiles, seconds) of admitted interactive requests being planned
        metrics.queue_depth.set_function(lambda: self._batcher.depth)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm the model on the model thread, then start batching; raises on failure."""
        loop = asyncio.get_running_loop()
        try:
            pipe = await loop.run_in_executor(self._executor, self._load)
            started = time.perf_counter()
            warm = await loop.run_in_executor(self._executor, pipe.warmup, self.batch_sizes)
            warm_seconds = time.perf_counter() - started
        except Exception as exc:
            self.state, self.error = EngineState.FAILED, f"{type(exc).__name__}: {exc}"
            await self._notify_room()  # background_ready() waiters get their NotReady
            raise
        if self.state is EngineState.STOPPED:
            return
        self._tile_seconds = {(tile, pipe.config.inference_steps): seconds for tile, seconds in warm.items()}
        self.pipeline = pipe
        self.metrics.set_model(pipe.name, pipe.version, pipe.device, pipe.dtype)
        self._scheduler = asyncio.create_task(self._schedule(), name="vpdsr-batcher")
        self.state = EngineState.READY
        await self._notify_room()
        log.info(
            "serving %s:%s on %s (%s); warmed tiles %s × batches %s in %.1f s; seconds per tile %s",
            pipe.name, pipe.version, pipe.device, pipe.dtype, pipe.tile_sizes, self.batch_sizes, warm_seconds,
            {tile: round(seconds, 4) for tile, seconds in warm.items()},
        )

    async def stop(self) -> None:
        """Stop batching and fail whatever is still waiting (the server is going away)."""
        self.state = EngineState.STOPPED
        await self._notify_room()
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        for work in list(self._works):
            self._fail(work, NotReady("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def readiness(self) -> CheckResult:
        """The ``model`` check of ``/readyz``. The state only: /readyz is unauthenticated, and a
        load error can name files."""
        return CheckResult(ok=self.state is EngineState.READY, state=self.state.value)

    # -- requests --------------------------------------------------------------------------------
    def ready_pipeline(self) -> SRPipeline:
        if self.state is not EngineState.READY or self.pipeline is None:
            detail = f": {self.error}" if self.error else ""
            raise NotReady(f"model {self.settings.model} is {self.state.value}{detail}")
        return self.pipeline

    def resolve_options(self, options: UpscaleOptions) -> Resolved:
        """The options checked against the loaded model, without running it: 503 while it is not
        ready; for ``model`` 409 (another model of the registry) or 404 (none); 422 for the rest,
        by the model's own rules (the ones ``vpdsr upscale`` applies). :meth:`upscale` calls it."""
        pipe = self.ready_pipeline()
        if options.model is not None:
            entry = Registry(self.settings.registry).resolve(options.model)
            if (entry.name, entry.version) != (pipe.name, pipe.version):
                raise ModelNotLoaded(
                    f"{options.model!r} is {entry.ref}, but this server serves {pipe.name}:{pipe.version}; "
                    "omit 'model' or send the request to a server of that model"
                )
        steps = pipe.check_steps(options.steps)
        scale = pipe.scale if options.scale is None else options.scale
        if not 2 <= scale <= pipe.scale:
            raise InvalidParameters(f"scale must be between 2 and {pipe.scale}, got {scale}")
        tile = pipe.check_tile(options.tile)
        return Resolved(pipe, steps, resolve_seed(options.seed), tile, scale)

    def retry_after(self) -> float:
        """Seconds until the tiles waiting now should be done: the back-off to suggest, capped at
        the request timeout (a client is never told to wait longer than a request may take)."""
        seconds = sum(self._queued_seconds(priority) for priority in Priority)
        return min(seconds, self.settings.request_timeout_s)

    def estimate(self, width: int, height: int, options: UpscaleOptions = UpscaleOptions()) -> tuple[int, float]:
        """(tiles, model seconds) of upscaling a ``width``×``height`` image alone: sizes only, no pixels."""
        return self._estimate(self.resolve_options(options), width, height)

    def _estimate(self, resolved: Resolved, width: int, height: int) -> tuple[int, float]:
        grid = resolved.pipe.layout(width, height, resolved.tile)
        tiles = len(grid.boxes)
        return tiles, tiles * self._seconds_per_tile((grid.tile, resolved.steps))

    async def background_ready(self) -> None:
        """Return once the model is ready and the background share of the queue has room: a job
        consumer awaits this before it takes a job, so jobs wait in Redis, not in memory."""
        async with self._room:
            await self._room.wait_for(lambda: self.state is not EngineState.LOADING and self._background_room() > 0)
        self.ready_pipeline()  # failed or stopped: NotReady

    async def upscale(
        self,
        image: Image.Image,
        options: UpscaleOptions = UpscaleOptions(),
        *,
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
        progress: Progress | None = None,
    ) -> UpscaleResult:
        """Upscale one image; ``deadline`` is a ``time.monotonic()`` value (None: no limit);
        ``progress(tiles done, tiles in total)`` is called on the event loop after each batch that
        held tiles of this image (a job's status shows it).

        The options are checked first (:meth:`resolve_options`, the model reference included).
        Interactive requests are admitted by estimated cost (413 / 429) before planning; background
        work is never refused for load and enters the batcher chunk by chunk.
        """
        resolved = self.resolve_options(options)
        pipe, steps = resolved.pipe, resolved.steps
        cost = self._estimate(resolved, image.width, image.height) if priority is Priority.INTERACTIVE else (0, 0.0)
        self._admit(*cost)
        # Admitted interactive work holds its place while it is planned, so a burst of requests
        # cannot all pass admission before any of them reaches the batcher.
        self._planning = (self._planning[0] + cost[0], self._planning[1] + cost[1])
        try:
            plan = await asyncio.to_thread(pipe.plan, image, resolved.seed, resolved.tile)
        finally:
            self._planning = (self._planning[0] - cost[0], self._planning[1] - cost[1])

        loop = asyncio.get_running_loop()
        work = _Work((plan.tile_size, steps), priority, time.monotonic(), plan.tiles, loop.create_future(),
                     progress=progress)
        self._works.add(work)
        if progress is not None:
            progress(0, len(work.tiles))  # planned: the total is known before any tile runs
        feeder = asyncio.create_task(self._feed(work), name="vpdsr-feed") if priority is Priority.BACKGROUND else None
        if feeder is None:
            self._batcher.add(work, range(len(work.tiles)))
            work.waiting = len(work.tiles)
            self._wake.set()
        try:
            async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                outputs = await work.future
        except TimeoutError:
            if work.started_at is None:
                raise QueueTimeout("the request could not start before its timeout", self.retry_after()) from None
            raise ComputeTimeout("the request did not finish before its timeout") from None
        finally:
            if feeder is not None:
                feeder.cancel()
            self._batcher.discard(work)
            work.waiting = 0
            self._works.discard(work)
            await self._notify_room()
        assert work.started_at is not None
        result = await asyncio.to_thread(_finish, plan, outputs, resolved.scale)
        queue_seconds = work.started_at - work.enqueued_at
        compute_seconds = time.monotonic() - work.started_at
        self.metrics.queue_wait.observe(queue_seconds)
        self.metrics.compute.observe(compute_seconds)
        return UpscaleResult(result, plan.seed, steps, queue_seconds, compute_seconds, pipe.name, pipe.version)

    def _admit(self, tiles: int, seconds: float) -> None:
        """Refuse an interactive request that cannot finish in time (413) or not behind the queue (429).
        Background work (cost 0) is always admitted: it waits for room in :meth:`_feed`."""
        if tiles == 0:
            return
        limit = self.settings.request_timeout_s
        if tiles > self.settings.max_queue or seconds > limit:
            where = "submit it to POST /v1/jobs" if self.settings.jobs_enabled else "send a smaller image"
            too_much = (
                f"{tiles} tiles, more than the {self.settings.max_queue} a synchronous request may queue"
                if tiles > self.settings.max_queue
                else f"about {seconds:.0f} s of compute, more than the {limit:.0f} s a synchronous request may take"
            )
            raise TooLargeForSync(f"this image needs {too_much} on this server; {where}")
        waiting = self._batcher.waiting[Priority.INTERACTIVE] + self._planning[0]
        ahead = self._queued_seconds(Priority.INTERACTIVE) + self._planning[1]
        if waiting + tiles > self.settings.max_queue or ahead + seconds > limit:
            raise TileQueueFull(
                f"busy: {waiting} tiles (about {ahead:.0f} s) are waiting ahead of this image's {tiles}; retry later",
                min(limit, max(1.0, ahead + seconds - limit)),
            )

    async def _feed(self, work: _Work) -> None:
        """Put background work's tiles into the batcher chunk by chunk, as the background share of
        the queue frees up (interactive work, admitted by cost, goes in whole)."""
        total, added = len(work.tiles), 0
        while added < total:
            async with self._room:
                await self._room.wait_for(lambda: self._background_room() > 0)
                chunk = min(total - added, self._background_room())
                self._batcher.add(work, range(added, added + chunk))
                work.waiting += chunk
            added += chunk
            self._wake.set()

    def _background_room(self) -> int:
        """Tiles the background share of the queue (half of ``max_queue``, at least one) can take now."""
        share = max(1, self.settings.max_queue // 2)
        return share - self._batcher.waiting[Priority.BACKGROUND]

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    def _seconds_per_tile(self, key: BatchKey) -> float:
        """Measured for this (tile, steps) key, else scaled from the warm-up of the model's default steps."""
        if key in self._tile_seconds:
            return self._tile_seconds[key]
        tile, steps = key
        default_steps = self.pipeline.config.inference_steps if self.pipeline else steps
        warm = self._tile_seconds.get((tile, default_steps), max(self._tile_seconds.values(), default=1.0))
        return warm * steps / default_steps

    def _queued_seconds(self, priority: Priority) -> float:
        """Estimated model seconds of the tiles of ``priority`` waiting in the batcher."""
        return sum(self._seconds_per_tile(work.key) * work.waiting for work in self._works if work.priority is priority)

    # -- the batching loop (event loop) and the model thread -------------------------------------
    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            batch = self._batcher.pop(time.monotonic())
            if batch is not None:
                for work, _ in batch.entries:
                    work.waiting -= 1
                await self._notify_room()
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
        key = entries[0][0].key
        estimate = self._seconds_per_tile(key)
        self._tile_seconds[key] = estimate + _EWMA * (seconds / len(entries) - estimate)
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
        updated: set[_Work] = set()
        for (work, i), output in zip(entries, outputs, strict=True):
            if work.future.done():
                continue
            work.outputs[i] = output
            work.pending -= 1
            updated.add(work)
            if work.pending == 0:
                work.future.set_result([o for o in work.outputs if o is not None])
        for work in updated:
            if work.progress is not None:
                work.progress(len(work.tiles) - work.pending, len(work.tiles))

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
