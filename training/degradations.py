"""Real-ESRGAN second-order degradation, batched in torch: makes the LR input of a training pair.

Real-world LR images went through unknown blur, resampling, sensor noise and JPEG, possibly more
than once (a photo resized and re-shared). Real-ESRGAN (Wang et al. 2021) simulates that with two
rounds of blur → resize → noise (→ JPEG) and a final resize + sinc + JPEG; ResShift trains on it with
the settings that are the defaults of :class:`DegradationConfig`:

1. first stage: blur (kernel per image), random resize (``scale_factor``, relative to the HR),
   Gaussian or Poisson noise, JPEG;
2. second stage, with probability ``second_order_prob``: blur with probability ``second.blur_prob``,
   random resize relative to the *target* LR size, noise;
3. final step, the two orders with equal chance: resize to HR/scale → sinc (probability
   ``final_sinc_prob`` per image, else identity) → JPEG, or JPEG → resize → sinc. The JPEG quality
   is ``second.jpeg_quality`` (applied whether or not the second stage ran, as in ResShift);
4. clamp and round to 8-bit levels.

As in Real-ESRGAN's batched implementation, the choices that change a tensor's size or code path
(resize direction, scale and mode, Gaussian vs Poisson, whether stage 2 or its blur run, the final
order) are drawn once per batch; kernels, noise levels, grey-vs-colour noise, JPEG qualities and the
final sinc are drawn per image. All scalar draws come from one CPU ``torch.Generator``, which also
seeds a generator on the images' device for the noise tensors, so a seed gives the same LR on a given
device.
"""

from __future__ import annotations

import math

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torchvision.transforms.functional import rgb_to_grayscale

from .config_files import Config
from .jpeg import jpeg_compress
from .kernels import (
    KernelConfig,
    bernoulli,
    categorical,
    choice,
    pulse_kernel,
    random_blur_kernel,
    random_sinc_kernel,
    uniform,
)

RESIZE_MODES = ("area", "bilinear", "bicubic")


class StageConfig(Config):
    """One degradation stage (defaults: ResShift's first stage).

    ``gaussian_sigma`` is on the 0–255 scale; ``poisson_scale`` multiplies the shot noise;
    ``resize_probs`` are the chances of up / down / keep, with up drawn from ``[1, resize_range[1]]``
    and down from ``[resize_range[0], 1]``.
    """

    kernel: KernelConfig = KernelConfig()
    blur_prob: float = 1.0
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    gaussian_sigma: tuple[float, float] = (1.0, 30.0)
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_quality: tuple[float, float] = (30.0, 95.0)


SECOND_STAGE = StageConfig(
    kernel=KernelConfig(sizes=tuple(range(3, 15, 2)), padded_size=15, sigma=(0.2, 1.5)),
    blur_prob=0.8,
    resize_probs=(0.3, 0.4, 0.3),
    resize_range=(0.3, 1.2),
    gaussian_sigma=(1.0, 25.0),
    poisson_scale=(0.05, 2.5),
)


class DegradationConfig(Config):
    """Every probability and range of the degradation; defaults are ResShift's ×4 real-SR settings.

    ``kind: bicubic`` replaces the whole chain with an antialiased bicubic ×1/scale resize (what
    PIL's BICUBIC and MATLAB's imresize do): the classic SR benchmark setting, and the one to
    train on when a model is judged by PSNR against bicubic-downsampled inputs.
    """

    kind: Literal["realesrgan", "bicubic"] = "realesrgan"
    scale: int = 4
    first: StageConfig = StageConfig()
    second: StageConfig = SECOND_STAGE
    second_order_prob: float = 0.5
    final_sinc_prob: float = 0.8
    final_sinc_sizes: tuple[int, ...] = tuple(range(3, 15, 2))
    final_sinc_cutoff: tuple[float, float] = (math.pi / 3, math.pi)
    final_kernel_size: int = 15
    jpeg_last_prob: float = 0.5
    """Chance of the final order resize → sinc → JPEG (else JPEG → resize → sinc)."""
    bicubic_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    """Chance, per image, that ``kind: realesrgan`` gives the clean bicubic LR instead of the chain's.
    A model trained on the chain alone learns to restore every input, and so smooths clean ones; a
    share of clean pairs teaches it to leave those alone."""


def to_8bit(images: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to the 256 levels an 8-bit LR file would hold."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def blur(images: Tensor, kernels: Tensor) -> Tensor:
    """Filter each image of ``(B, C, H, W)`` with its own kernel of ``(B, k, k)``, one grouped conv.

    Borders are reflected; images smaller than the kernel radius fall back to edge replication.
    """
    b, c, h, w = images.shape
    pad = kernels.shape[-1] // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    padded = F.pad(images, (pad, pad, pad, pad), mode=mode)
    weight = kernels.to(images).repeat_interleave(c, dim=0)[:, None]
    out = F.conv2d(padded.reshape(1, b * c, h + 2 * pad, w + 2 * pad), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def resize(
    images: Tensor, mode: str, size: tuple[int, int] | None = None, scale_factor: float | None = None
) -> Tensor:
    """``F.interpolate`` without antialiasing (as Real-ESRGAN), to ``size`` or by ``scale_factor``."""
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(images, size=size, scale_factor=scale_factor, mode=mode, align_corners=align)


def add_gaussian_noise(images: Tensor, sigma: Tensor, gray: Tensor, generator: torch.Generator) -> Tensor:
    """Add N(0, σ²) noise, σ ``(B,)`` on the 0–255 scale; ``gray`` ``(B,)`` images get the same noise in
    every channel (luminance noise), the others independent noise per channel. Clamps to [0, 1]."""
    b, _, h, w = images.shape
    colour = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    mono = torch.randn((b, 1, h, w), generator=generator, device=images.device, dtype=images.dtype)
    noise = torch.where(gray.view(b, 1, 1, 1), mono, colour) * (sigma.view(b, 1, 1, 1) / 255)
    return (images + noise).clamp(0, 1)


def _distinct_levels(levels: Tensor) -> Tensor:
    """Number of distinct 8-bit values in each image of integer-valued ``(B, C, H, W)``."""
    b = levels.shape[0]
    index = levels.long().flatten(1) + 256 * torch.arange(b, device=levels.device)[:, None]
    counts = torch.bincount(index.flatten(), minlength=256 * b).view(b, 256)
    return (counts > 0).sum(dim=1)


def _shot_noise(images: Tensor, generator: torch.Generator) -> Tensor:
    """Poisson noise of the image quantised to 8 bits, with 2^⌈log2 n⌉ photons per unit intensity for
    an image of n distinct levels (scikit-image's and Real-ESRGAN's rule)."""
    levels = torch.round(images.clamp(0, 1) * 255)
    photons = torch.exp2(torch.ceil(torch.log2(_distinct_levels(levels).to(images.dtype))))
    photons = photons.view(-1, 1, 1, 1)
    quantised = levels / 255
    return torch.poisson(quantised * photons, generator=generator) / photons - quantised


def add_poisson_noise(images: Tensor, scale: Tensor, gray: Tensor, generator: torch.Generator) -> Tensor:
    """Add shot noise times ``scale`` ``(B,)``; ``gray`` ``(B,)`` images get noise computed on their
    luminance and shared by the channels. Clamps to [0, 1]."""
    b = images.shape[0]
    colour = _shot_noise(images, generator)
    mono = _shot_noise(rgb_to_grayscale(images), generator)
    noise = torch.where(gray.view(b, 1, 1, 1), mono, colour) * scale.view(b, 1, 1, 1)
    return (images + noise).clamp(0, 1)


class Degrader:
    """HR batch → synthetic LR batch: ``Degrader(cfg)(hr, generator)``.

    ``hr`` is ``(B, 3, H, W)`` in [0, 1] on any device, H and W multiples of ``cfg.scale`` and at least
    ``8 * cfg.scale``; the result is float32 ``(B, 3, H/scale, W/scale)`` in [0, 1] on 8-bit levels.
    ``generator`` is a CPU ``torch.Generator`` or an int seed; ``None`` draws a seed from torch's global
    RNG (so ``torch.manual_seed`` makes it reproducible too).
    """

    def __init__(self, config: DegradationConfig | None = None) -> None:
        self.config = config or DegradationConfig()

    def __call__(self, hr: Tensor, generator: torch.Generator | int | None = None) -> Tensor:
        cfg = self.config
        b, c, h, w = hr.shape
        if c != 3 or h % cfg.scale or w % cfg.scale or min(h, w) < 8 * cfg.scale:
            raise ValueError(
                f"need (B, 3, H, W) with H, W multiples of {cfg.scale} and ≥ {8 * cfg.scale}, got {tuple(hr.shape)}"
            )
        if cfg.kind == "bicubic":
            return self._bicubic(hr)
        rng = _cpu_generator(generator)
        noise_rng = torch.Generator(device=hr.device)
        noise_rng.manual_seed(int(torch.randint(2**62, (), generator=rng)))
        target = (h // cfg.scale, w // cfg.scale)

        x = self._blur(hr.float(), cfg.first, rng)
        x = resize(x, choice(rng, RESIZE_MODES), scale_factor=_resize_scale(cfg.first, rng))
        x = self._noise(x, cfg.first, rng, noise_rng)
        x = jpeg_compress(x, _per_image(cfg.first.jpeg_quality, b, rng, x.device))

        if bernoulli(rng, cfg.second_order_prob):
            x = self._blur(x, cfg.second, rng)
            factor = _resize_scale(cfg.second, rng)
            x = resize(x, choice(rng, RESIZE_MODES), size=(int(target[0] * factor), int(target[1] * factor)))
            x = self._noise(x, cfg.second, rng, noise_rng)

        sinc = torch.stack([self._final_kernel(rng) for _ in range(b)])
        quality = _per_image(cfg.second.jpeg_quality, b, rng, x.device)
        mode = choice(rng, RESIZE_MODES)
        if bernoulli(rng, cfg.jpeg_last_prob):
            x = jpeg_compress(blur(resize(x, mode, size=target), sinc), quality)
        else:
            x = blur(resize(jpeg_compress(x, quality), mode, size=target), sinc)
        x = to_8bit(x)
        if cfg.bicubic_prob > 0:
            clean = (torch.rand(b, generator=rng) < cfg.bicubic_prob).to(x.device)
            x = torch.where(clean.view(b, 1, 1, 1), self._bicubic(hr), x)
        return x

    def _bicubic(self, hr: Tensor) -> Tensor:
        """Antialiased bicubic ×1/scale on 8-bit levels: the clean LR of the SR benchmarks."""
        h, w = hr.shape[-2:]
        return to_8bit(F.interpolate(hr.float(), size=(h // self.config.scale, w // self.config.scale),
                                     mode="bicubic", antialias=True))

    def _blur(self, x: Tensor, stage: StageConfig, rng: torch.Generator) -> Tensor:
        if not bernoulli(rng, stage.blur_prob):
            return x
        return blur(x, torch.stack([random_blur_kernel(rng, stage.kernel) for _ in range(x.shape[0])]))

    def _noise(self, x: Tensor, stage: StageConfig, rng: torch.Generator, noise_rng: torch.Generator) -> Tensor:
        b = x.shape[0]
        gray = torch.rand(b, generator=rng).lt(stage.gray_noise_prob).to(x.device)
        if bernoulli(rng, stage.gaussian_noise_prob):
            return add_gaussian_noise(x, _per_image(stage.gaussian_sigma, b, rng, x.device), gray, noise_rng)
        return add_poisson_noise(x, _per_image(stage.poisson_scale, b, rng, x.device), gray, noise_rng)

    def _final_kernel(self, rng: torch.Generator) -> Tensor:
        cfg = self.config
        if bernoulli(rng, cfg.final_sinc_prob):
            return random_sinc_kernel(rng, cfg.final_sinc_sizes, cfg.final_sinc_cutoff, cfg.final_kernel_size)
        return pulse_kernel(cfg.final_kernel_size)


def _cpu_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    seed = int(torch.randint(2**62, ())) if generator is None else generator
    return torch.Generator().manual_seed(seed)


def _resize_scale(stage: StageConfig, rng: torch.Generator) -> float:
    """Up, down or keep with ``stage.resize_probs``, then a uniform factor in that direction."""
    direction = categorical(rng, stage.resize_probs)
    if direction == 0:
        return uniform(rng, 1.0, stage.resize_range[1])
    if direction == 1:
        return uniform(rng, stage.resize_range[0], 1.0)
    return 1.0


def _per_image(bounds: tuple[float, float], n: int, rng: torch.Generator, device: torch.device) -> Tensor:
    """``n`` independent uniform draws in ``bounds``, moved to ``device``."""
    low, high = bounds
    return (low + (high - low) * torch.rand(n, generator=rng)).to(device)
