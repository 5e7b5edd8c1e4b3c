"""Centre crops of a folder of images, for the unpaired comparisons (RealSet65 at a fixed LR size).

    python benchmarks/centre_crops.py ../shared/data/eval/RealSet65 runs/realset128 --size 128
    python benchmarks/centre_crops.py ../shared/data/eval/RealSet65 runs/speed128 --size 128 --limit 8

Full-size RealSet65 photos take Real-ESRGAN about 40 s each on one CPU core; the centred ``--size``
square keeps the whole set within minutes and gives every method inputs of one size, so their CPU
times compare directly. An image smaller than the crop gives its own centred square. Written as PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.data import list_images
from training.eval_data import read_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=128, help="side of the centred square, in pixels")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (file-name order)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in list_images([args.src])[: args.limit]:
        image = read_image(path)
        side = min(args.size, *image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image.crop((left, top, left + side, top + side)).save(args.out / f"{path.stem}.png")
        written += 1
    print(f"wrote {written} centre crops of {args.size}² to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
