"""``vpdsr evaluate``: score a registry model on a benchmark folder and record it in ``metrics.json``.

Registered through the ``vpdsr.commands`` entry-point group (:func:`register`). :func:`data_options`
are also the data options of ``benchmarks/compare.py``, so both take the same images the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model.cli import common_options, device_options


def run(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate  # heavy (model, optional pyiqa): only when it runs

    config = EvalConfig(
        model=args.model,
        data=args.data,
        lr_dir=args.lr_dir,
        unpaired=args.unpaired,
        degrade=args.degrade,
        save_lr=args.save_lr,
        teacher=args.teacher,
        limit=args.limit,
        dataset_name=args.name,
        steps=args.steps,
        seed=args.seed,
        tile=args.tile,
        device=args.device,
        dtype=args.dtype,
        registry=args.registry,
        out=args.out,
    )
    evaluate(config)
    return 0


def data_options() -> argparse.ArgumentParser:
    """Which images, and how their LR inputs are made (see :mod:`training.eval_data`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", type=Path, required=True, help="folder of HR images (or LR images with --unpaired)")
    p.add_argument("--lr-dir", type=Path, default=None, help="folder of LR inputs matching the HR file names")
    p.add_argument("--unpaired", action="store_true", help="--data are LR images without ground truth")
    p.add_argument("--degrade", choices=["bicubic", "realesrgan"], default="bicubic",
                   help="how to make the LR from the HR images (default: bicubic)")
    p.add_argument("--seed", type=int, default=0, help="seed of --degrade realesrgan and of the diffusion sampler")
    p.add_argument("--save-lr", type=Path, default=None, metavar="DIR",
                   help="also write the LR images made from the HR ones into DIR (PNG)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (file-name order)")
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` to the ``vpdsr`` parser."""
    p = subparsers.add_parser(
        "evaluate",
        parents=[common_options(), device_options(), data_options()],
        help="PSNR/SSIM (Y), NIQE, bicubic baseline, IQA metrics and timing of a model on an image folder",
        description="Paired data: --data holds HR images; LR is made from them (--degrade: bicubic x1/4, or "
        "the Real-ESRGAN degradation seeded by --seed and the file name), or read from --lr-dir (matched by "
        "file name). Unpaired data (--unpaired): --data holds real LR images, scored by no-reference metrics only.",
    )
    p.add_argument("--model", required=True, help="registry reference: name, name:version or name@alias")
    p.add_argument("--teacher", default=None, help="also run this model and report student-teacher PSNR")
    p.add_argument("--name", default=None, help="dataset key in metrics.json (default: the folder's name, "
                   "+realesrgan-sSEED with --degrade realesrgan)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's own)")
    p.add_argument("--tile", type=int, default=None, help="tile size in LR pixels (default: automatic)")
    p.add_argument("--out", type=Path, default=None, help="also write per-image results to this JSON file")
    p.set_defaults(handler=run)
