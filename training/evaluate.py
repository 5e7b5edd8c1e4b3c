"""Evaluate a registry model on a folder of images; results go into the model's ``metrics.json``.

Two kinds of data (see :mod:`.eval_data` for where the LR inputs come from):

* **paired** — a folder of HR (ground-truth) images; the LR input is made from each (bicubic ×1/4,
  or the Real-ESRGAN degradation with a seed) or read from ``lr_dir``. Reported: PSNR/SSIM (Y
  channel, ``scale``-pixel border cropped), the same for plain bicubic up-sampling as the floor to
  beat, and LPIPS with pyiqa.
* **unpaired** — real LR photos with no ground truth (e.g. RealSet65): no-reference metrics only.

Both report NIQE of the output and of bicubic up-sampling (images too small for NIQE are left out of
its mean and named in ``niqe_skipped``), the median seconds per image (robust to the first call's
warm-up), CLIPIQA / MUSIQ / MANIQA when pyiqa is installed, and with a ``teacher`` the PSNR between
student and teacher outputs for the same input and seed (how closely the one-step student follows
the teacher).
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

from PIL import Image

from model.device import resolve_device, resolve_dtype
from model.pipeline import SRPipeline
from model.registry import Registry

from .eval_data import Degradation, EvalData, Sample
from .quality import IQAMetrics, NIQEScorer, psnr_y, ssim_y

Row = dict[str, float | None]
"""One image's metrics by name; None where a metric could not score that image."""


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run: which model, on which data, with which inference settings.

    ``seed`` seeds both the sampler and, with ``degrade="realesrgan"``, the LR synthesis."""

    model: str
    data: Path
    lr_dir: Path | None = None
    unpaired: bool = False
    degrade: Degradation = "bicubic"
    save_lr: Path | None = None
    teacher: str | None = None
    limit: int | None = None
    dataset_name: str | None = None
    steps: int | None = None
    seed: int = 0
    tile: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    registry: Path | None = None
    out: Path | None = None

    @property
    def eval_data(self) -> EvalData:
        return EvalData(self.data, self.lr_dir, self.unpaired, self.degrade, self.seed, self.limit, self.save_lr)

    @property
    def name(self) -> str:
        """Key of this dataset in ``metrics.json``."""
        return self.dataset_name or self.eval_data.name


def means(rows: list[Row]) -> Row:
    """Per-metric mean over the images that have the metric (None if none has); ``seconds`` included."""
    out: Row = {}
    for key in rows[0]:
        values = [v for r in rows if (v := r.get(key)) is not None]
        out[key] = statistics.fmean(values) if values else None
    return out


def finite(value: float | None) -> float | None:
    """JSON has no infinity (PSNR of identical images): such values are stored as null."""
    return value if value is not None and math.isfinite(value) else None


class Evaluator:
    """Runs a model (and optionally its teacher) over samples and scores each output."""

    def __init__(self, config: EvalConfig, notice: Callable[[str], None] = print) -> None:
        self.config = config
        self.data = config.eval_data
        self.registry = Registry(config.registry)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
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
        self.niqe = NIQEScorer(border=self.pipe.scale)

    def score(self, sample: Sample) -> Row:
        """Metrics of one image; keys depend on the data kind and the options."""
        scale = border = self.pipe.scale
        lr, hr = self.data.load(sample, scale)
        start = time.perf_counter()
        sr = self.pipe(lr, steps=self.steps, seed=self.config.seed, tile=self.config.tile)
        row: Row = {"seconds": time.perf_counter() - start}
        bicubic = lr.resize((lr.width * scale, lr.height * scale), Image.Resampling.BICUBIC)
        if hr is not None:
            row |= {
                "psnr_y": psnr_y(sr, hr, border),
                "ssim_y": ssim_y(sr, hr, border),
                "bicubic_psnr_y": psnr_y(bicubic, hr, border),
                "bicubic_ssim_y": ssim_y(bicubic, hr, border),
            }
        row |= {"niqe": self.niqe(sr, sample.name), "bicubic_niqe": self.niqe(bicubic, sample.name)}
        if self.teacher is not None:
            reference = self.teacher(lr, seed=self.config.seed, tile=self.config.tile)
            row["teacher_psnr_y"] = psnr_y(sr, reference, self.pipe.scale)
        return row | self.iqa(sr, hr)

    def summary(self, rows: list[Row]) -> dict[str, Any]:
        """What goes into metrics.json for this dataset: settings, means, median time per image."""
        out: dict[str, Any] = {
            "images": len(rows),
            "paired": not self.config.unpaired,
            "lr": self.data.lr_kind,
            "steps": self.steps,
            "seed": self.config.seed,
            "device": str(self.device),
            "dtype": str(self.pipe.dtype).removeprefix("torch."),
            "seconds_per_image": statistics.median(r["seconds"] for r in rows),
        }
        if self.niqe.skipped:
            out["niqe_skipped"] = dict(self.niqe.skipped)
        if self.teacher is not None:
            out["teacher"] = f"{self.teacher.name}:{self.teacher.version}"
        out |= {k: finite(v) for k, v in means(rows).items() if k != "seconds"}
        return out


def evaluate(config: EvalConfig, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate, print a table row per image and a mean row, and record the summary in the registry."""
    samples = config.eval_data.samples()
    evaluator = Evaluator(config, notice=print_fn)
    table = _Table(print_fn)
    rows = []
    for sample in samples:
        row = evaluator.score(sample)
        table.row(sample.name, row)
        rows.append(row)
    summary = evaluator.summary(rows)
    table.row("mean (time: median)", means(rows) | {"seconds": summary["seconds_per_image"]})
    for name, reason in evaluator.niqe.skipped.items():
        print_fn(f"note: {name} left out of the NIQE means: {reason}")

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

    def row(self, name: str, values: Row) -> None:
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
