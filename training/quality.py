"""Image-quality metrics for super-resolution, computed the way SR papers report them.

PSNR and SSIM are measured on the luma (Y) channel of ITU-R BT.601 YCbCr, on the 0–255 scale
(Y = 16 + 65.481·R + 128.553·G + 24.966·B for R, G, B in [0, 1]), after cropping ``scale`` pixels
from every border; SSIM uses an 11×11 Gaussian window with σ = 1.5 over the valid region only.
That is the convention of the SR literature (and of ResShift/SinSR/VPD-SR's tables), so numbers are
comparable to published ones.

NIQE (no reference, lower is better) is the project's own (:mod:`.niqe`), so every evaluation has a
perceptual score on the default path. The other no-reference metrics of the papers (CLIPIQA, MUSIQ,
MANIQA) and LPIPS come from the optional ``pyiqa`` package (``pip install 'vpd-sr[iqa]'``); without it
they are skipped. pyiqa is licensed for non-commercial use only (PolyForm Noncommercial), which is why
nothing needs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .niqe import ImageTooSmall, niqe

MAX_VALUE = 255.0
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image or uint8 array; greyscale is repeated over the channels."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image


def rgb_to_y(image: Image.Image | np.ndarray) -> np.ndarray:
    """BT.601 luma of an 8-bit RGB image, float64 in [16, 235] (not rounded, as in the SR literature)."""
    rgb = to_rgb_array(image).astype(np.float64)
    return 16.0 + rgb @ _Y_WEIGHTS


def crop_border(x: np.ndarray, border: int) -> np.ndarray:
    return x[border:-border, border:-border] if border > 0 else x


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = MAX_VALUE) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical inputs."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR of differently sized images: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian (float64); SSIM's 2-D window is its outer product."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = MAX_VALUE, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of two 2-D images (Wang et al. 2004), valid region only."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"SSIM needs two 2-D images of one size, got {a.shape} and {b.shape}")
    if min(a.shape) < window:
        raise ValueError(f"SSIM needs images of at least {window}×{window} pixels, got {a.shape}")
    w = gaussian_window(window, sigma)
    rows, cols = w.view(1, 1, -1, 1), w.view(1, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows), cols)

    x = torch.from_numpy(np.asarray(a, dtype=np.float64))[None, None]
    y = torch.from_numpy(np.asarray(b, dtype=np.float64))[None, None]
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def psnr_y(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, border: int = 0) -> float:
    """PSNR on the Y channel with ``border`` pixels cropped from each side."""
    return psnr(crop_border(rgb_to_y(a), border), crop_border(rgb_to_y(b), border))


def ssim_y(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, border: int = 0) -> float:
    """SSIM on the Y channel with ``border`` pixels cropped from each side."""
    return ssim(crop_border(rgb_to_y(a), border), crop_border(rgb_to_y(b), border))


class NIQEScorer:
    """NIQE with ``border`` pixels cropped, for many images: one too small for NIQE scores None and
    the reason is kept in ``skipped`` (by image name), so a small image never ends a whole run."""

    def __init__(self, border: int = 0) -> None:
        self.border = border
        self.skipped: dict[str, str] = {}

    def __call__(self, image: Image.Image, name: str) -> float | None:
        try:
            return niqe(image, crop_border=self.border)
        except ImageTooSmall as exc:
            self.skipped[name] = str(exc)
            return None


class IQAMetrics:
    """The optional pyiqa metrics: no-reference ones on every output, LPIPS where there is a GT.

    Each metric that cannot be set up (pyiqa missing, weights not available) is skipped with a
    one-line notice, so an evaluation never fails for want of an optional extra.
    """

    NO_REFERENCE = ("clipiqa", "musiq", "maniqa")  # NIQE: NIQEScorer
    FULL_REFERENCE = ("lpips",)

    def __init__(self, metrics: dict[str, Callable[..., Any]], device: torch.device) -> None:
        self.metrics = metrics
        self.device = device

    @classmethod
    def load(cls, device: torch.device, paired: bool, notice: Callable[[str], None] = print) -> "IQAMetrics":
        names = cls.NO_REFERENCE + (cls.FULL_REFERENCE if paired else ())
        try:
            import pyiqa  # type: ignore[import-not-found]
        except ImportError:
            notice(f"note: {', '.join(n.upper() for n in names)} skipped: pyiqa is not installed "
                   "(pip install 'vpd-sr[iqa]')")
            return cls({}, device)
        metrics = {}
        for name in names:
            try:
                metrics[name] = pyiqa.create_metric(name, device=device)
            except Exception as exc:  # noqa: BLE001 — any failure (weights, network) only skips the metric
                notice(f"note: {name.upper()} skipped: {type(exc).__name__}: {exc}".splitlines()[0])
        return cls(metrics, device)

    @property
    def names(self) -> list[str]:
        return list(self.metrics)

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(to_rgb_array(image).copy()).permute(2, 0, 1)[None]
        return pixels.to(self.device, torch.float32) / 255.0

    @torch.inference_mode()
    def __call__(self, sr: Image.Image, hr: Image.Image | None = None) -> dict[str, float]:
        """Scores of one SR image (``hr`` is needed only by the full-reference metrics)."""
        out: dict[str, float] = {}
        sr_t = self._tensor(sr)
        hr_t = self._tensor(hr) if hr is not None else None
        for name, metric in self.metrics.items():
            if name in self.FULL_REFERENCE:
                if hr_t is not None:
                    out[name] = float(metric(sr_t, hr_t))
            else:
                out[name] = float(metric(sr_t))
        return out
