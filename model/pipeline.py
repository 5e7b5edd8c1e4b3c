"""Image in, ×4 image out: the ResShift / VPD-SR inference pipeline.

Per tile of the (padded) LR image:  z_y = E(bicubic×sf(LR)) · scale_factor,
x_T = z_y + κ√η_T ε,  x̂0 = sampler(…),  SR = D(x̂0 / scale_factor)  (decoder quantises).

The work is exposed in three pieces so that the HTTP service can batch tiles of different
requests together: :meth:`SRPipeline.plan` (image → equal tiles + their noise), :meth:`run_tiles`
(a stacked batch of tiles → SR tiles) and :meth:`TilePlan.assemble` (SR tiles → image).
:meth:`SRPipeline.run_plan` strings the last two together for one planned image, and
:meth:`SRPipeline.__call__` all three.

Noise is drawn once for the whole padded latent from the request's seed and cropped per tile, so
results do not depend on how the image was tiled or batched and a seed reproduces a result.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .autoencoder import VQAutoencoder
from .color import color_fix
from .config import ModelConfig
from .checkpoint import build_networks, load_model
from .device import resolve_channels_last, resolve_dtype, resolve_threads
from .errors import InvalidRequest
from .latent import LatentCodec
from .registry import Registry
from .sampler import sample
from .seeds import resolve_seed
from .schedule import ResShiftSchedule
from .tiling import TileGrid
from .unet import SwinUNet

ImageInput = Image.Image | np.ndarray


@dataclass(frozen=True)
class Tile:
    lr: Tensor  # (3, t, t) in [-1, 1]
    noise: Tensor  # (C_latent, t·ls, t·ls)


@dataclass
class TilePlan:
    """How one image is cut into tiles, and everything needed to put the SR result together."""

    grid: TileGrid
    tiles: list[Tile]
    seed: int  # of the noise: the same seed, image and tile size give the same result
    height: int
    width: int
    scale: int
    grayscale: bool
    alpha: Image.Image | None

    @property
    def tile_size(self) -> int:
        return self.grid.tile

    def assemble(self, outputs: Sequence[Tensor]) -> Image.Image:
        """SR tiles (3, t·s, t·s) in [-1, 1], in ``tiles`` order → the upscaled PIL image."""
        canvas = self.grid.blend(list(outputs))[:, : self.height * self.scale, : self.width * self.scale]
        pixels = ((canvas.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels, "RGB")
        if self.grayscale:
            image = image.convert("L")
        if self.alpha is not None:
            # Alpha carries no texture for the diffusion model: a bicubic resize keeps edges clean.
            image.putalpha(self.alpha.resize(image.size, Image.Resampling.BICUBIC))
        return image


def split_alpha(image: ImageInput) -> tuple[Image.Image, bool, Image.Image | None]:
    """RGB image to process, whether the input was greyscale, and its alpha channel if any."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise InvalidRequest(f"expected a uint8 array (H, W[, 1|3|4]), got {image.dtype} {image.shape}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit greyscale: PIL's convert() would clip at 255 instead of rescaling the range.
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(wide / 257, 0, 255).round().astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    alpha = image.convert("RGBA").getchannel("A") if has_alpha else None
    grayscale = image.mode in ("L", "LA", "I", "I;16", "F", "1")
    return image.convert("RGB"), grayscale, alpha


def _pad(x: Tensor, height: int, width: int) -> Tensor:
    """Pad (B, C, h, w) on the bottom/right to (height, width); reflect where the image allows it."""
    ph, pw = height - x.shape[-2], width - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _batches(items: Sequence[Tile], size: int) -> Iterator[Sequence[Tile]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SRPipeline:
    """A loaded super-resolution model (Swin-UNet + VQGAN + schedule) on one device and dtype.

    ``dtype``, ``channels_last`` and ``threads`` default to the fast path of the machine
    (:mod:`model.device`): bf16 on CUDA and on CPUs with bf16 matrix units, float32 elsewhere,
    channels-last, one thread per usable core. ``dtype=torch.float32`` is the reference path.
    On the CPU a half dtype runs as autocast over float32 weights (convolutions and matrix products
    in the half type, everything autocast keeps in float32 stays there; GroupNorm computes in
    float32 regardless); on CUDA the weights themselves are cast.
    """

    def __init__(
        self,
        config: ModelConfig,
        unet: SwinUNet,
        autoencoder: VQAutoencoder,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = "auto",
        tile_sizes: Sequence[int] | None = None,
        tile_overlap: float = 0.25,
        max_tile_batch: int = 4,
        channels_last: bool | str = "auto",
        threads: int | None = None,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        name: str = "unnamed",
        version: str = "0",
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device) if isinstance(dtype, str) else dtype
        if isinstance(channels_last, str):
            channels_last = resolve_channels_last(channels_last)
        self.channels_last = channels_last
        self.threads = resolve_threads(threads)
        # CPU autocast keeps float32 weights: the half type only where a kernel gains from it.
        self.autocast = self.device.type == "cpu" and self.dtype != torch.float32
        self.weight_dtype = torch.float32 if self.autocast else self.dtype
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.unet = unet.eval().requires_grad_(False).to(self.device, self.weight_dtype, memory_format=memory_format)
        self.autoencoder = autoencoder.eval().requires_grad_(False).to(
            self.device, self.weight_dtype, memory_format=memory_format
        )
        self.codec = LatentCodec(
            self.autoencoder, latent_scaling=config.diffusion.scale_factor, upscale=config.diffusion.sf,
            memory_format=memory_format,
        )
        # The eager float32 path stays the reference; compile_mode (e.g. "max-autotune" or, on CUDA,
        # "reduce-overhead" for CUDA graphs) traces encode→sample→decode per tile size, see _compiled_forward.
        self.compile_mode = compile_mode
        self.compiled = compile_mode is not None
        self._forward = self._compiled_forward if self.compiled else self._tiles_forward
        if self.compiled:
            mode = {"mode": compile_mode} if compile_backend == "inductor" else {}
            self._compiled = torch.compile(self._tiles_forward, backend=compile_backend, dynamic=False, **mode)
        self.schedule = ResShiftSchedule(config.diffusion).to(self.device)
        self.scale = config.diffusion.sf
        # Latent pixels per LR pixel (1 for x4 SR with an f4 autoencoder).
        self.latent_scale = self.scale // config.autoencoder.ddconfig.downsample_factor
        self.latent_channels = config.autoencoder.embed_dim  # of the noise and the diffused latent
        self.multiple = max(1, self.unet.size_multiple // self.latent_scale)
        default_tiles = config.tile_sizes or (config.unet.image_size, 2 * config.unet.image_size)
        self.tile_sizes = tuple(sorted(self._tile_geometry(t) for t in (tile_sizes or default_tiles)))
        self.tile_overlap = tile_overlap
        self.max_tile_batch = max_tile_batch
        # Seconds per tile of each tile size, from warmup(): what layout() minimises per image.
        self.tile_seconds: dict[int, float] = {}
        self.name = name
        self.version = version

    @classmethod
    def from_registry(
        cls, ref: str, registry: Registry | str | Path | None = None, **kwargs: object
    ) -> "SRPipeline":
        reg = registry if isinstance(registry, Registry) else Registry(registry)
        loaded = load_model(reg, ref)
        entry = loaded.entry
        return cls(loaded.config, loaded.unet, loaded.autoencoder, name=entry.name, version=entry.version, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_state_dicts(
        cls, config: ModelConfig, unet_state: dict[str, Tensor], vq_state: dict[str, Tensor], **kwargs: object
    ) -> "SRPipeline":
        return cls(config, *build_networks(config, unet_state, vq_state), **kwargs)  # type: ignore[arg-type]

    # -- options: the one rule of each (CLI, service and jobs all ask these; the seed's is check_seed)
    def check_tile(self, tile: int | None) -> int | None:
        """A requested tile size: one of the model's tile sizes (``tile_sizes`` of its config.json,
        the shapes the service warms and batches); None leaves the choice to :meth:`layout`."""
        if tile is not None and tile not in self.tile_sizes:
            raise InvalidRequest(f"tile must be one of the model's tile sizes {list(self.tile_sizes)}, got {tile}")
        return tile

    def check_steps(self, steps: int | None) -> int:
        """Sampler steps: 1 to the model's diffusion steps; None is the model's ``inference_steps``."""
        steps = self.config.inference_steps if steps is None else steps
        if not 1 <= steps <= self.schedule.num_steps:
            raise InvalidRequest(f"steps must be between 1 and {self.schedule.num_steps} for this model, got {steps}")
        return steps

    def _tile_geometry(self, tile: int) -> int:
        """What any tile must be for the networks (the tile sizes themselves, and the tile of a direct
        :meth:`plan` / ``__call__``, which may try any size): a positive multiple of :attr:`multiple`."""
        if tile <= 0 or tile % self.multiple:
            raise InvalidRequest(f"tile size must be a positive multiple of {self.multiple} LR pixels, got {tile}")
        return tile

    # -- the three pieces ------------------------------------------------------------------------
    def layout(self, width: int, height: int, tile: int | None = None) -> TileGrid:
        """The tile grid of a ``width``×``height`` image, from its size alone: what a request will
        cost is known before any pixel is touched. ``tile`` None picks, among the model's tile sizes,
        the one that upscales this image at the lowest cost (:meth:`_grid_cost`)."""
        padded_h = max(math.ceil(height / self.multiple) * self.multiple, self.multiple)
        padded_w = max(math.ceil(width / self.multiple) * self.multiple, self.multiple)
        if tile is None:
            return min((self._grid(padded_h, padded_w, t) for t in self.tile_sizes), key=self._grid_cost)
        return self._grid(padded_h, padded_w, self._tile_geometry(tile))

    def _grid(self, padded_h: int, padded_w: int, tile: int) -> TileGrid:
        padded_h, padded_w = max(padded_h, tile), max(padded_w, tile)
        overlap = int(tile * self.tile_overlap) if tile < max(padded_h, padded_w) else 0
        return TileGrid(padded_h, padded_w, tile, overlap, self.scale)

    def _grid_cost(self, grid: TileGrid) -> tuple[float, int]:
        """What :meth:`layout` minimises: once :meth:`warmup` has timed every tile size on this
        machine, the image's seconds (tiles × seconds per tile; fewer tiles break ties), so the
        per-call overhead that makes small tiles dear on one CPU and cheap on another is measured,
        not guessed. Before that, the fewest tiles, then the smallest tile: the smallest tile size
        that holds the image, else the largest."""
        tiles = len(grid.boxes)
        if all(t in self.tile_seconds for t in self.tile_sizes):
            return tiles * self.tile_seconds[grid.tile], tiles
        return tiles, grid.tile

    def plan(self, image: ImageInput, seed: int | None = None, tile: int | TileGrid | None = None) -> TilePlan:
        """Pad the image and cut it into equal overlapping tiles, each with its share of the noise
        (from ``seed``, random when None: :func:`model.seeds.resolve_seed`; the plan keeps it, so the
        caller learns the seed it drew from :attr:`TilePlan.seed`). ``tile`` is a tile size (None:
        :meth:`layout` chooses) or the grid :meth:`layout` already gave for this image's size: the
        service prices a request by its grid before planning it, and cuts it by that same grid."""
        rgb, grayscale, alpha = split_alpha(image)
        width, height = rgb.size
        grid = tile if isinstance(tile, TileGrid) else self.layout(width, height, tile)
        if grid.height < height or grid.width < width:
            raise ValueError(f"a {grid.width}×{grid.height} grid cannot hold a {width}×{height} image")
        tile, padded_h, padded_w = grid.tile, grid.height, grid.width

        lr = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        lr = _pad(lr, padded_h, padded_w)[0]
        seed = resolve_seed(seed)
        ls = self.latent_scale
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(
            (self.latent_channels, padded_h * ls, padded_w * ls), generator=generator
        )
        tiles = [
            Tile(lr[:, y : y + tile, x : x + tile], noise[:, y * ls : (y + tile) * ls, x * ls : (x + tile) * ls])
            for y, x in grid.boxes
        ]
        return TilePlan(grid, tiles, seed, height, width, self.scale, grayscale, alpha)

    @torch.inference_mode()
    def run_tiles(self, lr: Tensor, noise: Tensor, steps: int | None = None) -> Tensor:
        """A batch of LR tiles (B, 3, t, t) in [-1, 1] and their noise → SR tiles (B, 3, st, st), float32 CPU."""
        steps = self.check_steps(steps)
        if self.device.type == "cuda":
            # Pinned host buffers make the copies asynchronous, so they overlap queued GPU work.
            lr, noise = lr.pin_memory(), noise.pin_memory()
        lr = lr.to(self.device, torch.float32, non_blocking=True)
        noise = noise.to(self.device, self.weight_dtype, non_blocking=True)
        out = self._forward(lr, noise, steps)
        if self.device.type != "cuda":
            return out.float()
        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host

    def _compiled_forward(self, lr: Tensor, noise: Tensor, steps: int) -> Tensor:
        """The compiled function with a symbolic batch size from two tiles up: each tile size then
        compiles twice (one tile; any batch) rather than once per batch size, which is what bounds
        the start-up of a server that warms many batch sizes. Sizes stay static otherwise."""
        if lr.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(lr, 0)
            torch._dynamo.maybe_mark_dynamic(noise, 0)
        return self._compiled(lr, noise, steps)

    def _tiles_forward(self, lr: Tensor, noise: Tensor, steps: int) -> Tensor:
        with torch.autocast(self.device.type, self.dtype) if self.autocast else contextlib.nullcontext():
            upscaled = self.codec.upsample(lr)
            x0 = sample(self.unet, self.schedule, self.codec.encode(upscaled), lr.to(self.weight_dtype), noise, steps)
            sr = self.codec.decode(x0)
        return color_fix(sr.float(), upscaled) if self.config.color_fix == "wavelet" else sr

    # -- convenience -----------------------------------------------------------------------------
    def __call__(
        self,
        image: ImageInput,
        steps: int | None = None,
        seed: int | None = None,
        tile: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Image.Image:
        """Upscale one image (any size; large ones are tiled, ``max_tile_batch`` tiles at a time):
        :meth:`plan`, then :meth:`run_plan`; bad ``steps`` are refused before any pixel is planned."""
        steps = self.check_steps(steps)
        return self.run_plan(self.plan(image, seed=seed, tile=tile), steps, progress)

    def run_plan(
        self, plan: TilePlan, steps: int | None = None, progress: Callable[[int, int], None] | None = None
    ) -> Image.Image:
        """Run a planned image's tiles, ``max_tile_batch`` at a time, and assemble the result; the
        caller keeps the plan, and with it the seed that was used. ``progress(tiles done, tiles in
        total)`` is called after each batch: a big image on a CPU takes minutes, and a progress bar
        tells the user it is moving."""
        outputs: list[Tensor] = []
        for batch in _batches(plan.tiles, self.max_tile_batch):
            lr = torch.stack([t.lr for t in batch])
            noise = torch.stack([t.noise for t in batch])
            outputs.extend(self.run_tiles(lr, noise, steps))
            if progress is not None:
                progress(len(outputs), len(plan.tiles))
        return plan.assemble(outputs)

    def warmup(self, batch_sizes: Sequence[int], steps: int | None = None) -> dict[int, float]:
        """Run every (tile bucket, batch size) shape so the first requests pay no start-up cost.

        A compiled model runs each shape twice: the first run compiles, the second records its CUDA
        graph (``reduce-overhead`` warms a graph up once before it records). Returns the seconds per
        tile of each bucket, timed on the last run of its largest batch (once the smaller ones have
        paid for allocations), and keeps them in :attr:`tile_seconds`: the service's first cost
        estimate, and what :meth:`layout` picks tile sizes by from then on (fixed after warm-up, so
        the tiling, and with it a seeded result, does not drift with the load).
        """
        runs = 2 if self.compiled else 1
        seconds: dict[int, float] = {}
        for tile in self.tile_sizes:
            for batch in sorted(batch_sizes):
                lr = torch.zeros(batch, 3, tile, tile)
                noise = torch.zeros(batch, self.latent_channels, tile * self.latent_scale, tile * self.latent_scale)
                for _ in range(runs):
                    started = time.perf_counter()
                    self.run_tiles(lr, noise, steps)
                seconds[tile] = (time.perf_counter() - started) / batch
        self.tile_seconds = seconds
        return seconds

    def describe_path(self) -> dict[str, object]:
        """How this pipeline computes: reported by ``/v1/models``, the service's start-up log and the
        benchmarks, so a number can always be matched with the path that produced it."""
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "autocast": self.autocast,
            "channels_last": self.channels_last,
            "compile": self.compile_mode,
            "threads": self.threads,
        }
