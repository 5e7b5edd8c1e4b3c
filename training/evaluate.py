"""Evaluate a registry model on a folder of images; results go into the model's ``metrics.json``.

Two kinds of data:

* **paired** — a folder of HR (ground-truth) images. The LR input is either made here, by cropping
  the HR image to a multiple of the scale and down-sampling it with PIL's bicubic filter (the
  classic "bicubic ×4" benchmark protocol), or read from ``lr_dir`` (matched by file name without
  extension, e.g. ``ImageNetBicubicx4/{gt,lq}``). Reported: PSNR/SSIM (Y channel, ``scale``-pixel
  border cropped), the same for plain bicubic up-sampling as the floor to beat, and LPIPS with pyiqa.
* **unpaired** — real LR photos with no ground truth (e.g. RealSet65): no-reference metrics only.

Both report the median seconds per image (robust to the first call's warm-up), CLIPIQA / MUSIQ /
MANIQA / NIQE when pyiqa is installed, and with a ``teacher`` the PSNR between student and teacher
outputs for the same input and seed (how closely the one-step student follows the teacher).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from model.device import resolve_device, resolve_dtype
from model.errors import VPDSRError
from model.pipeline import SRPipeline, split_alpha
from model.registry import Registry

from .data import list_images
from .metrics import IQAMetrics, psnr_y, ssim_y

# Folder names that say "the ground-truth half of a dataset"; the dataset is then named by the parent.
_GT_FOLDER_NAMES = {"gt", "hr", "hq", "gt_hr", "target"}


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run: which model, on which data, with which inference settings."""

    model: str
    data: Path
    lr_dir: Path | None = None
    unpaired: bool = False
    teacher: str | None = None
    limit: int | None = None
    dataset_name: str | None = None
    steps: int | None = None
    seed: int = 0
    tile: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    registry: Path | None = None
    out: Path | None = None

    @property
    def name(self) -> str:
        """Key of this dataset in ``metrics.json``."""
        if self.dataset_name:
            return self.dataset_name
        folder = self.data.resolve()
        return folder.parent.name if folder.name.lower() in _GT_FOLDER_NAMES else folder.name


@dataclass(frozen=True)
class Sample:
    """One test image: its LR input (a file, or made from ``hr``) and, for paired data, the GT."""

    name: str
    hr: Path | None
    lr: Path | None


def find_samples(config: EvalConfig) -> list[Sample]:
    """The images to evaluate, in file-name order, the first ``limit`` of them."""
    if config.unpaired and config.lr_dir is not None:
        raise VPDSRError("--lr-dir is for paired data; unpaired data are LR images already")
    if config.limit is not None and config.limit < 1:
        raise VPDSRError(f"--limit must be positive, got {config.limit}")
    paths = _images(config.data)[: config.limit]
    if config.unpaired:
        return [Sample(p.stem, None, p) for p in paths]
    if config.lr_dir is None:
        return [Sample(p.stem, p, None) for p in paths]
    lr_by_stem = {p.stem: p for p in _images(config.lr_dir)}
    missing = [p.name for p in paths if p.stem not in lr_by_stem]
    if missing:
        raise VPDSRError(f"no LR image in {config.lr_dir} for {len(missing)} HR image(s), e.g. {missing[0]}")
    return [Sample(p.stem, p, lr_by_stem[p.stem]) for p in paths]


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


def load_pair(sample: Sample, scale: int) -> tuple[Image.Image, Image.Image | None]:
    """(LR input, HR cropped to exactly ``scale`` × the LR size, or None for unpaired data)."""
    if sample.hr is None:
        assert sample.lr is not None
        return read_image(sample.lr), None
    hr = read_image(sample.hr)
    if sample.lr is None:
        hr = hr.crop((0, 0, hr.width - hr.width % scale, hr.height - hr.height % scale))
        if hr.width == 0 or hr.height == 0:
            raise VPDSRError(f"{sample.hr} is smaller than the scale factor {scale}")
        return hr.resize((hr.width // scale, hr.height // scale), Image.Resampling.BICUBIC), hr
    lr = read_image(sample.lr)
    width, height = lr.width * scale, lr.height * scale
    if hr.width < width or hr.height < height:
        raise VPDSRError(f"{sample.hr} ({hr.width}x{hr.height}) is smaller than {scale}x its LR {sample.lr} "
                         f"({lr.width}x{lr.height})")
    return lr, hr.crop((0, 0, width, height))


def means(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-metric mean over images (``seconds`` included)."""
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}


def finite(value: float) -> float | None:
    """JSON has no infinity (PSNR of identical images): such values are stored as null."""
    return value if math.isfinite(value) else None


class Evaluator:
    """Runs a model (and optionally its teacher) over samples and scores each output."""

    def __init__(self, config: EvalConfig, notice: Callable[[str], None] = print) -> None:
        self.config = config
        self.registry = Registry(config.registry)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype)
        self.entry = self.registry.resolve(config.model)
        self.pipe = SRPipeline.from_registry(self.entry.ref, self.registry, device=device, dtype=dtype)
        self.teacher = (
            SRPipeline.from_registry(config.teacher, self.registry, device=device, dtype=dtype)
            if config.teacher is not None
            else None
        )
        self.steps = self.pipe.check_steps(config.steps)
        self.device = device
        self.iqa = IQAMetrics.load(device, paired=not config.unpaired, notice=notice)

    def score(self, sample: Sample) -> dict[str, float]:
        """Metrics of one image; keys depend on the data kind and the options."""
        lr, hr = load_pair(sample, self.pipe.scale)
        start = time.perf_counter()
        sr = self.pipe(lr, steps=self.steps, seed=self.config.seed, tile=self.config.tile)
        row = {"seconds": time.perf_counter() - start}
        if hr is not None:
            border = self.pipe.scale
            bicubic = lr.resize(hr.size, Image.Resampling.BICUBIC)
            row |= {
                "psnr_y": psnr_y(sr, hr, border),
                "ssim_y": ssim_y(sr, hr, border),
                "bicubic_psnr_y": psnr_y(bicubic, hr, border),
                "bicubic_ssim_y": ssim_y(bicubic, hr, border),
            }
        if self.teacher is not None:
            reference = self.teacher(lr, seed=self.config.seed, tile=self.config.tile)
            row["teacher_psnr_y"] = psnr_y(sr, reference, self.pipe.scale)
        return row | self.iqa(sr, hr)

    def summary(self, rows: list[dict[str, float]]) -> dict[str, Any]:
        """What goes into metrics.json for this dataset: settings, means, median time per image."""
        out: dict[str, Any] = {
            "images": len(rows),
            "paired": not self.config.unpaired,
            "lr": "bicubic" if self.config.lr_dir is None and not self.config.unpaired else "files",
            "steps": self.steps,
            "seed": self.config.seed,
            "device": str(self.device),
            "dtype": self.config.dtype,
            "seconds_per_image": statistics.median(r["seconds"] for r in rows),
        }
        if self.teacher is not None:
            out["teacher"] = f"{self.teacher.name}:{self.teacher.version}"
        out |= {k: finite(v) for k, v in means(rows).items() if k != "seconds"}
        return out


def evaluate(config: EvalConfig, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate, print a table row per image and a mean row, and record the summary in the registry."""
    samples = find_samples(config)
    evaluator = Evaluator(config, notice=print_fn)
    table = _Table(print_fn)
    rows = []
    for sample in samples:
        row = evaluator.score(sample)
        table.row(sample.name, row)
        rows.append(row)
    summary = evaluator.summary(rows)
    table.row("mean (time: median)", means(rows) | {"seconds": summary["seconds_per_image"]})

    entry = evaluator.entry
    evaluator.registry.write_metrics(entry, entry.metrics() | {config.name: summary})
    images = f"{len(rows)} image{'s' if len(rows) > 1 else ''}"
    print_fn(f"{entry.ref} on {config.name} ({images}): metrics written to {entry.path / 'metrics.json'}")
    if config.out is not None:
        config.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "model": entry.ref,
            "dataset": config.name,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            "summary": summary,
            "images": [{"name": s.name} | {k: finite(v) for k, v in r.items()} for s, r in zip(samples, rows)],
        }
        config.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return summary


class _Table:
    """Fixed-width table printed as results arrive, so long CPU runs show progress."""

    def __init__(self, print_fn: Callable[[str], None]) -> None:
        self.print_fn = print_fn
        self.columns: list[str] | None = None

    def row(self, name: str, values: dict[str, float]) -> None:
        if self.columns is None:
            self.columns = list(values)
            self.print_fn(f"{'image':<24}" + "".join(f"{c:>16}" for c in self.columns))
        cells = "".join(f"{_format(values.get(c)):>16}" for c in self.columns)
        self.print_fn(f"{name[:24]:<24}{cells}")


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
