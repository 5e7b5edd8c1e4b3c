r"""Bicubic, registry model(s) and Real-ESRGAN x4plus (the anchor) side by side on the same ×4 inputs.

    python benchmarks/compare.py --data ../shared/data/eval/CSet14 --model vpdsr-small:2 --out runs/compare/CSet14
    python benchmarks/compare.py --data ../shared/data/eval/CSet14 --degrade realesrgan --seed 0 \
        --model vpdsr-small:2 --model other-model:1 --out runs/compare/CSet14-realesrgan
    python benchmarks/compare.py --data ../shared/data/eval/ImageNetBicubicx4/gt \
        --lr-dir ../shared/data/eval/ImageNetBicubicx4/lq --out runs/compare/ImageNet
    python benchmarks/compare.py --data ../shared/data/eval/RealSet65 --unpaired --out runs/compare/RealSet65

The images and their LR inputs are exactly those of ``vpdsr evaluate`` with the same data options
(training/eval_data.py). Per method: PSNR-Y / SSIM-Y (4-pixel border) where there is ground truth,
NIQE (lower is better), median seconds per image and its ratio to the first registry model. Written
to OUT/compare.json and OUT/compare.md, and OUT/crops/NAME.png for the first ``--crops`` images: the
centred ``--crop-size`` square of bicubic | each model | Real-ESRGAN | HR (HR only where it exists).
``--threads 1`` (default) gives every method the same single CPU core, so CPU times are comparable.
Real-ESRGAN needs the optional extra (``pip install -e '.[compare]'``); ``--no-realesrgan`` leaves it out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from model.cli import DEFAULT_MODEL, common_options
from model.device import resolve_device
from model.errors import VPDSRError
from model.pipeline import SRPipeline
from model.registry import Registry
from training.eval_cli import data_options
from training.eval_data import EvalData
from training.evaluate import Row, finite, means
from training.quality import NIQEScorer, psnr_y, ssim_y

from crops import side_by_side  # benchmarks/crops.py, next to this script

SCALE = 4  # Real-ESRGAN x4plus and the crops are ×4; so must the registry models be
REALESRGAN = "Real-ESRGAN x4plus"


@dataclass
class Method:
    """One way of making the ×4 image, and its per-image scores in file order."""

    label: str
    upscale: Callable[[Image.Image], Image.Image]
    rows: list[Row] = field(default_factory=list)


def bicubic(lr: Image.Image) -> Image.Image:
    return lr.resize((lr.width * SCALE, lr.height * SCALE), Image.Resampling.BICUBIC)


def registry_method(ref: str, args: argparse.Namespace, device: torch.device) -> Method:
    pipe = SRPipeline.from_registry(ref, Registry(args.registry), device=device)
    if pipe.scale != SCALE:
        raise VPDSRError(f"{pipe.name}:{pipe.version} upscales ×{pipe.scale}; this comparison is ×{SCALE}")
    return Method(f"{pipe.name}:{pipe.version}", lambda lr: pipe(lr, seed=args.seed, tile=args.tile))


def realesrgan_method(device: torch.device) -> Method:
    """Real-ESRGAN x4plus, or a clear error naming the extra it needs."""
    try:
        from training.realesrgan import load_x4plus, upscale

        model = load_x4plus(device=str(device))
    except (ImportError, VPDSRError) as exc:
        raise VPDSRError(f"{REALESRGAN} is not available: {exc} (or leave it out with --no-realesrgan)") from None
    return Method(REALESRGAN, lambda lr: upscale(model, lr.convert("RGB")))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score every method on every image, write the crops, and return the report (compare.json)."""
    if args.threads < 1 or args.crops < 0 or args.crop_size < 1:
        raise VPDSRError("--threads and --crop-size must be positive, --crops not negative")
    torch.set_num_threads(args.threads)
    data = EvalData(args.data, args.lr_dir, args.unpaired, args.degrade, args.seed, args.limit, args.save_lr)
    samples = data.samples()
    device = resolve_device(args.device)
    models = [registry_method(ref, args, device) for ref in args.model or [DEFAULT_MODEL]]
    labels = [m.label for m in models]
    if len(set(labels)) < len(labels):
        raise VPDSRError(f"--model names one model more than once: {', '.join(labels)}")
    methods = [Method("bicubic", bicubic), *models]
    if not args.no_realesrgan:
        methods.append(realesrgan_method(device))
    niqe = NIQEScorer(border=SCALE)
    crop_files = []
    for index, sample in enumerate(samples):
        lr, hr = data.load(sample, SCALE)
        outputs = [score(method, lr, hr, sample.name, niqe) for method in methods]
        if index < args.crops:
            crop_files.append(f"crops/{sample.name}.png")
            (args.out / "crops").mkdir(parents=True, exist_ok=True)
            views = [view.convert("RGB") for view in outputs + ([hr] if hr is not None else [])]
            side_by_side(views, args.crop_size).save(args.out / crop_files[-1])
        print(f"{sample.name}: " + ", ".join(f"{m.label} {m.rows[-1]['seconds']:.3f}s" for m in methods))

    report: dict[str, Any] = {
        "dataset": data.name,
        "lr": data.lr_kind,
        "seed": args.seed,
        "paired": not data.unpaired,
        "images": len(samples),
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "time_reference": models[0].label,
        "methods": [method_summary(m, models[0]) for m in methods],
    }
    if niqe.skipped:
        report["niqe_skipped"] = niqe.skipped
    report["crops"] = {"columns": [m.label for m in methods] + ([] if data.unpaired else ["HR"]), "files": crop_files}
    report["per_image"] = [
        {"name": s.name} | {m.label: {k: finite(v) for k, v in m.rows[i].items()} for m in methods}
        for i, s in enumerate(samples)
    ]
    return report


def score(method: Method, lr: Image.Image, hr: Image.Image | None, name: str, niqe: NIQEScorer) -> Image.Image:
    """Run one method on one LR image, append its scores to ``method.rows``, return its output."""
    start = time.perf_counter()
    output = method.upscale(lr)
    row: Row = {"seconds": time.perf_counter() - start}
    if hr is not None:
        row |= {"psnr_y": psnr_y(output, hr, SCALE), "ssim_y": ssim_y(output, hr, SCALE)}
    method.rows.append(row | {"niqe": niqe(output, name)})
    return output


def method_summary(method: Method, reference: Method) -> dict[str, Any]:
    """Mean scores, median seconds per image, and the time relative to ``reference``'s."""
    seconds = statistics.median(r["seconds"] for r in method.rows)
    reference_seconds = statistics.median(r["seconds"] for r in reference.rows)
    scores = {k: finite(v) for k, v in means(method.rows).items() if k != "seconds"}
    return {"method": method.label} | scores | {"seconds_per_image": seconds, "time_ratio": seconds / reference_seconds}


def markdown(report: dict[str, Any]) -> str:
    """compare.md: the table of means, the crops, and the command that made them."""
    paired = report["paired"]
    reference = report["time_reference"]
    head = ["method", *(["PSNR-Y (dB)", "SSIM-Y"] if paired else []), "NIQE ↓", "s / image", f"time / {reference}"]
    lines = [
        f"# {report['dataset']}: ×4 from {_LR_SOURCES[report['lr']].format(seed=report['seed'])}, "
        f"{report['images']} images",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for row in report["methods"]:
        cells = [row["method"], *([_num(row["psnr_y"], 2), _num(row["ssim_y"], 4)] if paired else []),
                 _num(row["niqe"], 2), f"{row['seconds_per_image']:.3g}", f"{row['time_ratio']:.3g}×"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{report['device']}, {report['threads']} thread(s), torch {report['torch']}; PSNR/SSIM on the "
              "Y channel with a 4-pixel border; time is the median per image."]
    for name, reason in report.get("niqe_skipped", {}).items():
        lines.append(f"NIQE leaves out {name}: {reason}.")
    if report["crops"]["files"]:
        lines += ["", "Crops, left to right: " + " | ".join(report["crops"]["columns"]), ""]
        lines += [f"![{Path(f).stem}]({f})" for f in report["crops"]["files"]]
    lines += ["", f"`{report['command']}`", ""]
    return "\n".join(lines)


_LR_SOURCES = {"bicubic": "bicubic ×1/4 of the HR", "realesrgan": "the Real-ESRGAN degradation of the HR (seed {seed})",
               "files": "given LR files"}


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compare.py", parents=[common_options(), data_options()],
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, metavar="REF",
                        help=f"registry model, repeatable; the first is the time reference (default: {DEFAULT_MODEL})")
    parser.add_argument("--no-realesrgan", action="store_true", help="leave Real-ESRGAN x4plus out")
    parser.add_argument("--out", type=Path, required=True, help="folder for compare.json, compare.md and crops/")
    parser.add_argument("--crops", type=int, default=4, metavar="N", help="side-by-side crops of the first N images")
    parser.add_argument("--crop-size", type=int, default=128, help="side of the centred crop in HR pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a fair CPU comparison)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--tile", type=int, default=None, help="registry models' tile size in LR pixels")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except VPDSRError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    report["command"] = shlex.join(["python", "benchmarks/compare.py", *argv])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (args.out / "compare.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
