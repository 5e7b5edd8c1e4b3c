"""The warmed model behind a dynamic batcher: the one entry point for every upscale.

Synchronous requests and background jobs both call :meth:`InferenceEngine.upscale` (through
:func:`service.upscale.run_upscale`), which checks the options, the model reference included, once
(:meth:`InferenceEngine.resolve_options`: :class:`Resolved`). The image's tile layout is computed
once, from its size (:meth:`SRPipeline.layout`): admission prices it, and the request is cut by that
same grid into tiles (:meth:`SRPipeline.plan`). Its tiles wait in the
:class:`~service.batcher.Batcher` with those of other requests, batches run on one dedicated
model thread (the event loop never blocks, so health checks and metrics answer under load), and
the request's SR tiles are put back together (:meth:`TilePlan.assemble`).

Admission is by cost, decided from the image size alone before any pixel is planned:

- the engine knows the seconds per tile of each tile bucket (timed at warm-up, then an EWMA of
  every batch), so it estimates a request's compute as tiles × seconds per tile;
- an interactive request that could not finish within ``request_timeout_s`` even on an idle
  server (or, when ``max_queue`` is set, has more tiles than that) is refused at once
  (:class:`~service.failures.TooLargeForSync`), whose message gives the largest image of that shape
  that would fit, and which says what to do instead (a job when Redis is configured, else the
  setting to raise).
  The limit is the measured speed times the timeout, not a tile count: it follows the machine and
  the model's tile sizes;
- one that could finish, but not behind the interactive tiles already waiting, is refused for
  now (:class:`~service.failures.TileQueueFull`) with a retry-after from the estimate, never above
  the timeout;
- background work (jobs) is never refused for being busy: its tiles enter the batcher in chunks
  while the background share of the queue (half of ``max_queue``, 128 tiles when unset) has room,
  so an image of any size within the pixel limits completes, and the wait is not bounded by a
  deadline. Interactive tiles always run first. :meth:`InferenceEngine.background_ready` lets a
  job consumer take a job only when there is room for it.

Other guarantees:

- bounded wait: past its deadline an interactive request gives up — :class:`~service.failures.QueueTimeout`
  if none of its tiles started, :class:`~service.failures.ComputeTimeout` otherwise — and its waiting tiles
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
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

import torch
from PIL import Image
from torch import Tensor

from model import Registry, SRPipeline
from model.device import resolve_device
from model.errors import ModelNotFound
from model.pipeline import Tile, TilePlan
from model.tiling import TileGrid
from model.seeds import check_seed

from .batcher import Batch, Batcher, BatchKey, Priority, warm_batch_sizes
from .costs import TileCosts, largest_fitting
from .failures import (
    ComputeFailed,
    ComputeOutOfMemory,
    ComputeTimeout,
    Failure,
    Instead,
    InvalidOptions,
    ModelNotLoaded,
    NotReady,
    QueueTimeout,
    TileQueueFull,
    TooLargeForJob,
    TooLargeForSync,
    UnknownModel,
)
from .prometheus import Metrics
from .schemas import CheckResult, UpscaleOptions
from .settings import Settings

log = logging.getLogger("vpdsr.service")


Progress = Callable[[int, int], None]
"""(tiles done, tiles in total) of one image, reported after each batch that held its tiles."""


class EngineState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Resolved:
    """The inference options of an :class:`UpscaleOptions` checked against the loaded model,
    defaults filled in: what the rest of the engine reads (output format and quality are the
    encoder's, :func:`service.upscale.run_upscale`)."""

    pipe: SRPipeline
    steps: int
    seed: int | None  # None: a random one, drawn when the image is planned (the result says which)
    tile: int | None  # None: chosen per image by the pipeline's layout
    scale: int  # 2..model scale; below the model's, the result is Lanczos-resized

    def layout(self, width: int, height: int) -> TileGrid:
        """The tile grid of a ``width``×``height`` image under these options."""
        return self.pipe.layout(width, height, self.tile)


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
    """The served model on the path the settings choose. ``auto`` dtype, channels-last and threads
    follow the machine (:mod:`model.device`), so one configuration serves at the hardware's speed on
    a GPU and on a CPU with or without bf16 units; a compiled model compiles during
    :meth:`SRPipeline.warmup`, before ``/readyz`` turns ready."""
    return SRPipeline.from_registry(
        settings.model,
        Registry(settings.registry),
        device=resolve_device(settings.device),
        dtype=settings.dtype,
        channels_last=settings.channels_last,
        threads=settings.threads,
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
        self._costs = TileCosts()  # seconds per tile: timed at warm-up, then every batch; decays unmeasured
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
        except Exception:
            # What the model's status shows: the exception names files; the log has it.
            self.state, self.error = EngineState.FAILED, "the model could not be loaded (the server's log says why)"
            await self._notify_room()  # background_ready() waiters get their NotReady
            raise
        if self.state is EngineState.STOPPED:
            return
        self._costs.warmed(warm, pipe.config.inference_steps)
        self.pipeline = pipe
        self.metrics.set_model(pipe.name, pipe.version, pipe.device, pipe.dtype)
        self._scheduler = asyncio.create_task(self._schedule(), name="vpdsr-batcher")
        self.state = EngineState.READY
        await self._notify_room()
        log.info(
            "serving %s:%s on %s; warmed tiles %s × batches %s in %.1f s; seconds per tile %s",
            pipe.name, pipe.version, pipe.describe_path(), pipe.tile_sizes, self.batch_sizes, warm_seconds,
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
            # The state only: a load error names files (the log has it).
            raise NotReady(f"model {self.settings.model} is {self.state.value}; retry later")
        return self.pipeline

    def resolve_options(self, options: UpscaleOptions) -> Resolved:
        """The options checked against the loaded model, without running it: :class:`NotReady` while
        it is not ready; for ``model`` :class:`ModelNotLoaded` (another model of the registry) or
        :class:`UnknownModel` (none); for the rest the model's own rules (the ones ``vpdsr upscale``
        applies). :meth:`upscale` calls it."""
        pipe = self.ready_pipeline()
        if options.model is not None:
            try:
                entry = Registry(self.settings.registry).resolve(options.model)
            except ModelNotFound:  # its message may list the registry's models or folders
                raise UnknownModel(f"unknown model {options.model!r}") from None
            if (entry.name, entry.version) != (pipe.name, pipe.version):
                raise ModelNotLoaded(
                    f"{options.model!r} is {entry.ref}, but this server serves {pipe.name}:{pipe.version}; "
                    "omit 'model' or send the request to a server of that model"
                )
        steps = pipe.check_steps(options.steps)
        scale = pipe.scale if options.scale is None else options.scale
        if not 2 <= scale <= pipe.scale:
            raise InvalidOptions(f"scale must be between 2 and {pipe.scale}, got {scale}")
        tile = pipe.check_tile(options.tile)
        return Resolved(pipe, steps, check_seed(options.seed), tile, scale)

    def retry_after(self) -> float:
        """Seconds until the tiles waiting now should be done: the back-off to suggest, capped at
        the request timeout (a client is never told to wait longer than a request may take)."""
        seconds = sum(self._queued_seconds(priority) for priority in Priority)
        return min(seconds, self.settings.request_timeout_s)

    def estimate(self, width: int, height: int, options: UpscaleOptions = UpscaleOptions()) -> tuple[int, float]:
        """(tiles, model seconds) of upscaling a ``width``×``height`` image alone: sizes only, no pixels."""
        return self._estimate(self.resolve_options(options), width, height)

    def check_job(self, width: int, height: int, options: UpscaleOptions = UpscaleOptions()) -> None:
        """What :meth:`upscale` checks of background work before it plans any pixel: the options and
        the cost (:class:`TooLargeForJob` over ``job_max_tiles``). The job API calls it at submission."""
        self._admit(Priority.BACKGROUND, *self.estimate(width, height, options))

    def _estimate(self, resolved: Resolved, width: int, height: int) -> tuple[int, float]:
        return self._cost(resolved.layout(width, height), resolved.steps)

    def _cost(self, grid: TileGrid, steps: int) -> tuple[int, float]:
        """(tiles, model seconds) of an image laid out as ``grid``."""
        tiles = len(grid.boxes)
        return tiles, tiles * self._seconds_per_tile((grid.tile, steps))

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
        Interactive requests are admitted by estimated cost (:meth:`_admit`) before planning; background
        work is never refused for load and enters the batcher chunk by chunk.
        """
        resolved = self.resolve_options(options)
        pipe, steps = resolved.pipe, resolved.steps
        grid = resolved.layout(image.width, image.height)  # priced here, and the plan's tiles
        tiles, seconds = self._cost(grid, steps)
        self._admit(priority, tiles, seconds, (resolved, image.width, image.height))
        # Admitted interactive work holds its place while it is planned, so a burst of requests
        # cannot all pass admission before any of them reaches the batcher.
        cost = (tiles, seconds) if priority is Priority.INTERACTIVE else (0, 0.0)
        self._planning = (self._planning[0] + cost[0], self._planning[1] + cost[1])
        try:
            plan = await asyncio.to_thread(pipe.plan, image, resolved.seed, grid)
        finally:
            self._planning = (self._planning[0] - cost[0], self._planning[1] - cost[1])

        loop = asyncio.get_running_loop()
        work = _Work((plan.tile_size, steps), priority, time.monotonic(), plan.tiles, loop.create_future(),
                     progress=progress)
        self._works.add(work)
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
                raise QueueTimeout("the request could not start before its timeout",
                                   retry_after_s=self.retry_after()) from None
            if priority is Priority.INTERACTIVE:  # its batches have measured the cost meanwhile
                measured = self._cost(grid, steps)[1]
                raise ComputeTimeout(
                    f"the request did not finish within the {self.settings.request_timeout_s:g} s a synchronous "
                    f"request may take (VPDSR_REQUEST_TIMEOUT_S); this image needs an estimated {measured:.0f} s "
                    "here.", self._instead(measured),
                ) from None
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

    def _admit(self, priority: Priority, tiles: int, seconds: float,
               shape: tuple[Resolved, int, int] | None = None) -> None:
        """Refuse an interactive request that cannot finish in time (:class:`TooLargeForSync`) or not
        behind the queue (:class:`TileQueueFull`). Background work is never refused for load (it waits
        for room in :meth:`_feed`), only for a cost over ``job_max_tiles`` (:class:`TooLargeForJob`),
        which would hold a worker for hours."""
        if priority is Priority.BACKGROUND:
            if tiles > self.settings.job_max_tiles:
                raise TooLargeForJob(
                    f"this image is {tiles} tiles, an estimated {seconds:.0f} s of compute on this server, more "
                    f"than the {self.settings.job_max_tiles} tiles a job may have (VPDSR_JOB_MAX_TILES). To get it "
                    "done: send a smaller image, or run `vpdsr upscale` on your own machine"
                )
            return
        limit = self.settings.request_timeout_s
        max_tiles = self.settings.max_queue  # None: bounded by the measured time alone
        if seconds > limit or (max_tiles is not None and tiles > max_tiles):
            raise self._too_large_for_sync(tiles, seconds, shape)
        waiting = self._batcher.waiting[Priority.INTERACTIVE] + self._planning[0]
        ahead = self._queued_seconds(Priority.INTERACTIVE) + self._planning[1]
        if ahead + seconds > limit or (max_tiles is not None and waiting + tiles > max_tiles):
            raise TileQueueFull(
                f"busy: {waiting} tiles (about {ahead:.0f} s) are waiting ahead of this image's {tiles}; retry later",
                retry_after_s=min(limit, max(1.0, ahead + seconds - limit)),
            )

    def _too_large_for_sync(self, tiles: int, seconds: float, shape: tuple[Resolved, int, int] | None) -> TooLargeForSync:
        """The refusal of an interactive request over the synchronous limit: the estimate it was
        refused on, the largest image of its shape that fits on this server now, and what to do instead."""
        limit, max_tiles = self.settings.request_timeout_s, self.settings.max_queue
        if max_tiles is not None and tiles > max_tiles:
            too_much = f"more than the {max_tiles} tiles a synchronous request may queue (VPDSR_MAX_QUEUE)"
        else:
            too_much = f"more than the {limit:g} s a synchronous request may take (VPDSR_REQUEST_TIMEOUT_S)"
        fits = ""
        if shape is not None:
            resolved, width, height = shape

            def fitting(w: int, h: int) -> bool:
                n, s = self._estimate(resolved, w, h)
                return s <= limit and (max_tiles is None or n <= max_tiles)

            most = largest_fitting(fitting, width, height)
            if most != (0, 0):
                fits = f"; a synchronous request here takes images of this shape up to about {most[0]}×{most[1]}"
            size = f"this {width}×{height} image"
        else:
            size = "this image"
        return TooLargeForSync(
            f"{size} is {tiles} tiles, an estimated {seconds:.1f} s of compute on this server (measured "
            f"{seconds / max(tiles, 1):.3g} s per tile), {too_much}{fits}.", self._instead(seconds, tiles),
        )

    def _instead(self, seconds: float, tiles: int | None = None) -> Instead:
        """What gets done an image too large for a synchronous request on this server: a job when
        the server has a queue, else the limit an operator would raise for it."""
        setting = f"VPDSR_REQUEST_TIMEOUT_S above {math.ceil(seconds * 1.5)}"
        if self.settings.max_queue is not None and tiles is not None and tiles > self.settings.max_queue:
            setting = f"VPDSR_MAX_QUEUE to {tiles} or more"
        return Instead(self.settings.jobs_enabled, setting)

    async def _feed(self, work: _Work) -> None:
        """Put background work's tiles into the batcher chunk by chunk, as its part of the
        background share of the queue frees up (interactive work, admitted by cost, goes in whole)."""
        total, added = len(work.tiles), 0
        while added < total:
            async with self._room:
                await self._room.wait_for(lambda: self._job_room(work) > 0)
                chunk = min(total - added, self._job_room(work))
                self._batcher.add(work, range(added, added + chunk))
                work.waiting += chunk
            added += chunk
            self._wake.set()

    def _background_share(self) -> int:
        """Tiles background work may have waiting: half of ``max_queue`` (of 256 when it is unset),
        at least one."""
        return max(1, (self.settings.max_queue or 256) // 2)

    def _background_room(self) -> int:
        """Tiles the background share of the queue can take now."""
        return self._background_share() - self._batcher.waiting[Priority.BACKGROUND]

    def _job_room(self, work: _Work) -> int:
        """Tiles one background job may add now: each of the n jobs running holds at most
        1/(n+1) of the share, so a giant job never fills it, there is always room for one more
        job (:meth:`background_ready`), and the batcher takes the jobs' tiles in turn."""
        jobs = sum(other.priority is Priority.BACKGROUND for other in self._works)
        fair = max(1, self._background_share() // (jobs + 1))
        return min(self._background_room(), fair - work.waiting)

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    def _seconds_per_tile(self, key: BatchKey) -> float:
        return self._costs.seconds(key, self._default_steps(key))

    def _default_steps(self, key: BatchKey) -> int:
        return self.pipeline.config.inference_steps if self.pipeline else key[1]

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
        self._costs.measured(key, seconds / len(entries), self._default_steps(key))
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
        if not isinstance(exc, Failure):
            log.error("model failed on a request", exc_info=exc)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                exc = ComputeOutOfMemory("out of memory on the model device; retry later",
                                         retry_after_s=self.retry_after())
            else:
                exc = ComputeFailed("the model failed on this image (a server fault, in its log)")
        work.future.set_exception(exc)


def _finish(plan: TilePlan, outputs: list[Tensor], scale: int) -> Image.Image:
    """SR tiles → image, Lanczos-resized when a smaller scale than the model's was asked for."""
    image = plan.assemble(outputs)
    if scale != plan.scale:
        image = image.resize((plan.width * scale, plan.height * scale), Image.Resampling.LANCZOS)
    return image
