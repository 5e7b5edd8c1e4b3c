"""The test images of an evaluation and their LR inputs, shared by ``vpdsr evaluate`` and
``benchmarks/compare.py`` so that both score exactly the same inputs.

The LR input of an image comes from one of four places:

* ``bicubic`` (default): the HR image cropped to a multiple of the scale and down-sampled with PIL's
  bicubic filter — the classic "bicubic ×4" benchmark protocol;
* ``realesrgan``: the project's Real-ESRGAN second-order degradation (:class:`~.degradations.Degrader`
  with the training defaults), run on the CPU in float32 with a generator seeded from the run's seed
  and the image's file name, so an image gets the same LR whatever ``--limit`` or the file order;
* ``lr_dir``: given LR files matched by file name without extension (e.g. ``ImageNetBicubicx4/{gt,lq}``);
* ``unpaired``: ``data`` holds real LR photos without ground truth (e.g. RealSet65).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import VPDSRError
from model.pipeline import split_alpha

from .data import list_images
from .degradations import DegradationConfig, Degrader

Degradation = Literal["bicubic", "realesrgan"]

# Folder names that say "the ground-truth half of a dataset"; the dataset is then named by the parent.
_GT_FOLDER_NAMES = {"gt", "hr", "hq", "gt_hr", "target"}


@dataclass(frozen=True)
class Sample:
    """One test image: its LR input (a file, or made from ``hr``) and, for paired data, the GT."""

    name: str
    hr: Path | None
    lr: Path | None


@dataclass(frozen=True)
class EvalData:
    """Where the test images are and how their LR inputs are made (``seed``: of the degradation)."""

    data: Path
    lr_dir: Path | None = None
    unpaired: bool = False
    degrade: Degradation = "bicubic"
    seed: int = 0
    limit: int | None = None
    save_lr: Path | None = None
    """Folder to write the LR images made here into (PNG, named after the HR image)."""

    @property
    def name(self) -> str:
        """The data folder's name (its parent's for a ``gt``-like folder), plus the degradation and
        seed when the LR is synthesised, e.g. ``CSet14+realesrgan-s0``: results of different LR never
        share a key."""
        folder = self.data.resolve()
        name = folder.parent.name if folder.name.lower() in _GT_FOLDER_NAMES else folder.name
        return f"{name}+realesrgan-s{self.seed}" if self.lr_kind == "realesrgan" else name

    @property
    def lr_kind(self) -> str:
        """``bicubic`` or ``realesrgan`` (LR made here), or ``files`` (given LR, paired or not)."""
        return "files" if self.unpaired or self.lr_dir is not None else self.degrade

    def samples(self) -> list[Sample]:
        """The images to evaluate, in file-name order, the first ``limit`` of them."""
        self._check()
        paths = _images(self.data)[: self.limit]
        if self.unpaired:
            return [Sample(p.stem, None, p) for p in paths]
        if self.lr_dir is None:
            return [Sample(p.stem, p, None) for p in paths]
        lr_by_stem = {p.stem: p for p in _images(self.lr_dir)}
        missing = [p.name for p in paths if p.stem not in lr_by_stem]
        if missing:
            raise VPDSRError(f"no LR image in {self.lr_dir} for {len(missing)} HR image(s), e.g. {missing[0]}")
        return [Sample(p.stem, p, lr_by_stem[p.stem]) for p in paths]

    def _check(self) -> None:
        if self.degrade not in get_args(Degradation):
            raise VPDSRError(f"--degrade must be one of {', '.join(get_args(Degradation))}, got {self.degrade!r}")
        if self.unpaired and self.lr_dir is not None:
            raise VPDSRError("--lr-dir is for paired data; unpaired data are LR images already")
        given = "--unpaired" if self.unpaired else "--lr-dir" if self.lr_dir is not None else None
        if given and self.degrade != "bicubic":
            raise VPDSRError(f"--degrade makes the LR from HR images; with {given} the LR are given")
        if given and self.save_lr is not None:
            raise VPDSRError(f"--save-lr saves LR images made here; with {given} they are files already")
        if self.save_lr is not None and self.save_lr.resolve() == self.data.resolve():
            raise VPDSRError("--save-lr must not be the --data folder: the LR images would replace the HR ones")
        if self.limit is not None and self.limit < 1:
            raise VPDSRError(f"--limit must be positive, got {self.limit}")

    def load(self, sample: Sample, scale: int) -> tuple[Image.Image, Image.Image | None]:
        """(LR input, HR cropped to exactly ``scale`` × the LR size, or None for unpaired data)."""
        if sample.hr is None:
            assert sample.lr is not None
            return read_image(sample.lr), None
        hr = read_image(sample.hr)
        if sample.lr is not None:
            return _given_pair(read_image(sample.lr), hr, sample, scale)
        hr = hr.crop((0, 0, hr.width - hr.width % scale, hr.height - hr.height % scale))
        lr = self._make_lr(hr, sample.hr, scale)
        if self.save_lr is not None:
            self.save_lr.mkdir(parents=True, exist_ok=True)
            lr.save(self.save_lr / f"{sample.name}.png")
        return lr, hr

    def _make_lr(self, hr: Image.Image, path: Path, scale: int) -> Image.Image:
        if self.degrade == "realesrgan":
            return realesrgan_lr(hr, scale, image_seed(self.seed, path.name), path)
        if hr.width == 0 or hr.height == 0:
            raise VPDSRError(f"{path} is smaller than the scale factor {scale}")
        return hr.resize((hr.width // scale, hr.height // scale), Image.Resampling.BICUBIC)


def _given_pair(lr: Image.Image, hr: Image.Image, sample: Sample, scale: int) -> tuple[Image.Image, Image.Image]:
    width, height = lr.width * scale, lr.height * scale
    if hr.width < width or hr.height < height:
        raise VPDSRError(f"{sample.hr} ({hr.width}x{hr.height}) is smaller than {scale}x its LR {sample.lr} "
                         f"({lr.width}x{lr.height})")
    return lr, hr.crop((0, 0, width, height))


def image_seed(seed: int, file_name: str) -> int:
    """The degradation seed of one image: a stable hash (CRC-32, not Python's salted ``hash``) of the
    run's seed and the file name, so it depends on neither the file order nor the machine."""
    return zlib.crc32(f"{seed}/{file_name}".encode())


def realesrgan_lr(hr: Image.Image, scale: int, seed: int, path: Path) -> Image.Image:
    """Synthetic RGB LR of an HR image (sides multiples of ``scale``) with the training degradation.

    Always on the CPU in float32: the GPU's noise generator and kernels would give other pixels."""
    config = DegradationConfig(scale=scale)
    minimum = 8 * scale
    if hr.width < minimum or hr.height < minimum:
        raise VPDSRError(f"{path} ({hr.width}x{hr.height}) is too small for --degrade realesrgan "
                         f"(needs at least {minimum}x{minimum})")
    pixels = torch.from_numpy(np.asarray(hr.convert("RGB")).copy()).permute(2, 0, 1)[None]
    lr = Degrader(config)(pixels.float() / 255, seed)
    return Image.fromarray((lr[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise VPDSRError(f"not a folder of images: {folder}")
    try:
        return list_images([folder])
    except ValueError as exc:
        raise VPDSRError(str(exc)) from None


def read_image(path: Path) -> Image.Image:
    """An RGB image, or an ``L`` one for greyscale files (the model then answers in greyscale too)."""
    try:
        with Image.open(path) as img:
            image = ImageOps.exif_transpose(img)
            image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise VPDSRError(f"cannot read {path} as an image: {exc}") from None
    rgb, grayscale, _ = split_alpha(image)
    return rgb.convert("L") if grayscale else rgb
