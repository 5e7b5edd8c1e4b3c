"""Before/after crops for the docs: LR (nearest ×4) | bicubic ×4 | model ×4 | HR, side by side.

    python benchmarks/crops.py --model vpdsr-small --out docs/examples \
        ../shared/data/eval/CSet5/butterfly.png ../shared/data/eval/CSet14/comic.png

Each HR image is cropped to a multiple of 4 and bicubic-downsampled ×4 (the benchmark setting),
then a ``--crop`` square around the centre of every panel is written as one PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from model import SRPipeline


def side_by_side(views: list[Image.Image], crop: int, gap: int = 4) -> Image.Image:
    """The centred ``crop`` square of each view (all of one size), left to right on white."""
    w, h = views[0].size
    size = min(crop, w, h)
    left, top = (w - size) // 2, (h - size) // 2
    out = Image.new(views[0].mode, (len(views) * (size + gap) - gap, size), "white")
    for i, view in enumerate(views):
        out.paste(view.crop((left, top, left + size, top + size)), (i * (size + gap), 0))
    return out


def panel(hr: Image.Image, pipe: SRPipeline, crop: int, seed: int) -> Image.Image:
    w, h = hr.width - hr.width % 4, hr.height - hr.height % 4
    hr = hr.crop((0, 0, w, h))
    lr = hr.resize((w // 4, h // 4), Image.Resampling.BICUBIC)
    views = [
        lr.resize((w, h), Image.Resampling.NEAREST),
        lr.resize((w, h), Image.Resampling.BICUBIC),
        pipe(lr, seed=seed).convert(hr.mode),
        hr,
    ]
    return side_by_side(views, crop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--model", default="vpdsr-small@production")
    parser.add_argument("--registry", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--crop", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = SRPipeline.from_registry(args.model, args.registry)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        with Image.open(path) as img:
            hr = img.convert("RGB")
        target = args.out / f"{path.stem}.png"
        panel(hr, pipe, args.crop, args.seed).save(target)
        print(target)


if __name__ == "__main__":
    main()
