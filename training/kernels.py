"""Blur kernels of the Real-ESRGAN degradation model and their random sampling.

Kernels are drawn one per image on the CPU from a ``torch.Generator`` (a few hundred tiny tensors per
batch: cheap, and it keeps the draws reproducible whatever device filters the images), then
zero-padded to a fixed size so that a batch of kernels of different sizes stacks into one tensor for a
single grouped convolution on the images' device.

Families (Real-ESRGAN, Wang et al. 2021), all odd-sized, centred and normalised to sum 1. With
``d = xᵀ Σ⁻¹ x`` the squared Mahalanobis distance for ``Σ = R(θ) diag(σx², σy²) R(θ)ᵀ``:

- ``iso`` / ``aniso``: Gaussian ``exp(-d / 2)``;
- ``generalized_iso`` / ``generalized_aniso``: generalised Gaussian ``exp(-d^β / 2)`` (heavier or
  lighter tails than a Gaussian);
- ``plateau_iso`` / ``plateau_aniso``: ``1 / (1 + d^β)`` (flat top, slow fall-off);
- ``sinc``: circular low-pass ``ωc J1(ωc r) / (2π r)``, the ideal disc filter, whose negative lobes
  give the ringing and overshoot seen around edges in real images.

Isotropic kernels use ``σy = σx`` and ``θ = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from pydantic import model_validator
from torch import Tensor

from .config_files import Config

T = TypeVar("T")

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


class KernelConfig(Config):
    """Distribution of one stage's blur kernel (ResShift/Real-ESRGAN first-stage defaults).

    ``sinc_cutoff`` applies to sizes below ``sinc_large_size``; larger sinc kernels may cut lower
    (``sinc_cutoff_large``), since only they have room for the wider main lobe of a low cut-off.
    """

    sizes: tuple[int, ...] = tuple(range(3, 21, 2))  # odd 3–19, drawn uniformly
    padded_size: int = 21
    type_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma: tuple[float, float] = (0.2, 3.0)
    rotation: tuple[float, float] = (-math.pi, math.pi)
    beta_generalized: tuple[float, float] = (0.5, 4.0)
    beta_plateau: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1
    sinc_cutoff: tuple[float, float] = (math.pi / 3, math.pi)
    sinc_cutoff_large: tuple[float, float] = (math.pi / 5, math.pi)
    sinc_large_size: int = 13

    @model_validator(mode="after")
    def _check(self) -> KernelConfig:
        if len(self.type_probs) != len(KERNEL_TYPES):
            raise ValueError(f"type_probs needs one probability per kernel type {KERNEL_TYPES}")
        if self.padded_size % 2 == 0 or any(s % 2 == 0 or s > self.padded_size for s in self.sizes):
            raise ValueError(f"kernel sizes must be odd and at most the odd padded_size, got {self}")
        return self


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One draw from U[low, high) (``low == high`` gives that constant)."""
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def bernoulli(generator: torch.Generator, p: float) -> bool:
    """True with probability ``p`` (never for 0, always for 1)."""
    return torch.rand((), generator=generator, dtype=torch.float64).item() < p


def categorical(generator: torch.Generator, weights: Sequence[float]) -> int:
    """Index drawn with probability proportional to ``weights``."""
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=generator))


def choice(generator: torch.Generator, options: Sequence[T]) -> T:
    """One of ``options``, all equally likely."""
    return options[categorical(generator, [1.0] * len(options))]


def _beta(generator: torch.Generator, low: float, high: float) -> float:
    """Shape parameter below or above 1 with equal chance, as Real-ESRGAN draws it.

    For the plateau range [1, 2] this means β = 1 half of the time; kept so the kernel distribution
    is the one ResShift was trained on.
    """
    return uniform(generator, low, 1.0) if bernoulli(generator, 0.5) else uniform(generator, 1.0, high)


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Column (x) and row (y) offsets from the centre of a ``size``² kernel, float64."""
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _mahalanobis(size: int, sigma_x: float, sigma_y: float, theta: float) -> Tensor:
    """``xᵀ Σ⁻¹ x`` on the grid: coordinates rotated into the kernel's principal axes."""
    x, y = _grid(size)
    cos, sin = math.cos(theta), math.sin(theta)
    u, v = cos * x + sin * y, -sin * x + cos * y
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float = 1.0) -> Tensor:
    """``exp(-d^β / 2)`` normalised; ``β = 1`` is the ordinary Gaussian."""
    kernel = torch.exp(-0.5 * _mahalanobis(size, sigma_x, sigma_y, theta) ** beta)
    return (kernel / kernel.sum()).float()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> Tensor:
    """``1 / (1 + d^β)`` normalised."""
    kernel = 1.0 / (1.0 + _mahalanobis(size, sigma_x, sigma_y, theta) ** beta)
    return (kernel / kernel.sum()).float()


def sinc_kernel(size: int, cutoff: float) -> Tensor:
    """Circular low-pass filter with cut-off ``cutoff`` (radians per pixel, π = Nyquist), normalised."""
    x, y = _grid(size)
    r = torch.sqrt(x**2 + y**2)
    centre = r == 0
    r = torch.where(centre, torch.ones_like(r), r)  # the limit at r = 0 is set below
    kernel = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r)
    kernel = torch.where(centre, torch.full_like(r, cutoff**2 / (4 * math.pi)), kernel)
    return (kernel / kernel.sum()).float()


def pulse_kernel(size: int) -> Tensor:
    """The identity filter (a centred 1)."""
    kernel = torch.zeros(size, size)
    kernel[size // 2, size // 2] = 1.0
    return kernel


def pad_kernel(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a centred odd kernel to ``size``² (same filter, stackable with others)."""
    pad = (size - kernel.shape[-1]) // 2
    return torch.nn.functional.pad(kernel, (pad, pad, pad, pad))


def random_sinc_kernel(
    generator: torch.Generator, sizes: Sequence[int], cutoff: tuple[float, float], padded_size: int
) -> Tensor:
    """A sinc kernel of random size and cut-off (Real-ESRGAN's final sinc filter)."""
    return pad_kernel(sinc_kernel(choice(generator, sizes), uniform(generator, *cutoff)), padded_size)


def random_blur_kernel(generator: torch.Generator, cfg: KernelConfig) -> Tensor:
    """One stage's blur kernel: sinc with probability ``cfg.sinc_prob``, else a random family."""
    size = choice(generator, cfg.sizes)
    if bernoulli(generator, cfg.sinc_prob):
        cutoff = cfg.sinc_cutoff_large if size >= cfg.sinc_large_size else cfg.sinc_cutoff
        return pad_kernel(sinc_kernel(size, uniform(generator, *cutoff)), cfg.padded_size)
    kind = KERNEL_TYPES[categorical(generator, cfg.type_probs)]
    sigma_x = uniform(generator, *cfg.sigma)
    sigma_y, theta = sigma_x, 0.0
    if kind.endswith("aniso"):
        sigma_y, theta = uniform(generator, *cfg.sigma), uniform(generator, *cfg.rotation)
    if kind.startswith("plateau"):
        kernel = plateau_kernel(size, sigma_x, sigma_y, theta, _beta(generator, *cfg.beta_plateau))
    elif kind.startswith("generalized"):
        kernel = generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, _beta(generator, *cfg.beta_generalized))
    else:
        kernel = generalized_gaussian_kernel(size, sigma_x, sigma_y, theta)
    return pad_kernel(kernel, cfg.padded_size)
