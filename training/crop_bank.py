"""A bank of HR training crops, cut in proportion to image area.

The training photographs range from 481×321 BSDS scans to 24-megapixel wallpapers. Sampling one crop
per *file* would let the many small BSDS images dominate and leave the large photos — which hold most
of the fine texture — nearly unseen; decoding a 24-megapixel JPEG for every 64-pixel crop would
also starve a CPU training run. So the crops are cut once, ahead of training:

* the number of crops of each image is proportional to its area (largest-remainder rounding of
  ``count × area / total area``, from the image header alone, so nothing is decoded twice);
* each image is decoded once and its crops are drawn uniformly at random from a generator seeded
  by ``(seed, file index)``: the same sources and seed give the same bank on every machine;
* crops are lossless PNGs named ``<source folder>_<file stem>_<k>.png``, or JPEGs (no chroma
  subsampling) at a given quality where the bank must travel small: to a device machine, whose
  command carries at most 64 MiB with the repository.

Training then samples the bank uniformly (``--data BANK``), which is sampling the photographs by
area. Images smaller than the crop contribute none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .data import list_images


def allocate(areas: Sequence[int], count: int) -> list[int]:
    """``count`` crops shared in proportion to ``areas`` (largest remainder: the sum is exactly ``count``)."""
    total = sum(areas)
    if total <= 0:
        return [0] * len(areas)
    exact = np.asarray(areas, dtype=np.float64) * count / total
    shares = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - shares), kind="stable")[: count - int(shares.sum())]:
        shares[index] += 1
    return shares.tolist()


def make_crop_bank(
    sources: Sequence[Path], out_dir: Path, size: int, count: int, seed: int = 0, jpeg_quality: int | None = None
) -> int:
    """Write ``count`` random ``size``² crops of the images in ``sources`` to ``out_dir``; returns how many.
    ``jpeg_quality``: write JPEGs at this quality instead of PNGs.

    Raises ``FileNotFoundError``/``ValueError`` (from :func:`training.data.list_images`) for bad
    sources and ``ValueError`` when no image is at least ``size`` pixels on its short side.
    """
    paths = list_images(sources)
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(image.size)
    areas = [w * h if min(w, h) >= size else 0 for w, h in sizes]
    if not any(areas):
        raise ValueError(f"no image has a short side of at least {size} pixels")
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix, options = (".png", {}) if jpeg_quality is None else (".jpg", {"quality": jpeg_quality, "subsampling": 0})
    written = 0
    for index, (path, (width, height), share) in enumerate(zip(paths, sizes, allocate(areas, count))):
        if share == 0:
            continue
        rng = np.random.default_rng([seed, index])
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        for k in range(share):
            left, top = int(rng.integers(width - size + 1)), int(rng.integers(height - size + 1))
            crop = rgb.crop((left, top, left + size, top + size))
            crop.save(out_dir / f"{path.parent.name}_{path.stem}_{k}{suffix}", **options)
            written += 1
    return written
