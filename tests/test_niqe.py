"""NIQE (training/niqe.py) against the reference implementation's scores, plus its edge cases.

tests/fixtures/niqe/niqe_reference.json holds the reference scores of 21 variants of 11 images;
each ``variant`` says how the scored image is made from the file with PIL.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.niqe import ImageTooSmall, niqe

FIXTURES = Path(__file__).parent / "fixtures" / "niqe"
REFERENCE = json.loads((FIXTURES / "niqe_reference.json").read_text())


def make_variant(name: str, variant: str) -> np.ndarray:
    """The RGB uint8 image the reference scored: the file itself or a PIL-bicubic resampling of it."""
    with Image.open(FIXTURES / name) as f:
        im = f.convert("RGB")
    w, h = im.size
    if variant == "bicubic_x4_of_bicubic_down4":
        im = im.resize((w // 4, h // 4), Image.BICUBIC).resize((w // 4 * 4, h // 4 * 4), Image.BICUBIC)
    elif variant == "bicubic_x4":
        im = im.resize((4 * w, 4 * h), Image.BICUBIC)
    else:
        assert variant in ("hr", "as_is"), variant
    return np.asarray(im)


@pytest.mark.parametrize("entry", REFERENCE, ids=lambda e: f"{e['image']}-{e['variant']}")
def test_matches_reference(entry: dict) -> None:
    assert niqe(make_variant(entry["image"], entry["variant"])) == pytest.approx(entry["niqe"], abs=0.01)


@pytest.fixture(scope="module")
def butterfly() -> np.ndarray:
    return make_variant("CSet5/butterfly.png", "hr")


@pytest.mark.parametrize("shape", [(95, 400), (400, 95), (96, 96), (191, 191)])
def test_too_small_raises_with_sizes(shape: tuple[int, int]) -> None:
    with pytest.raises(ImageTooSmall, match=rf"two 96×96 blocks.*got {shape[0]}×{shape[1]}"):
        niqe(np.zeros((*shape, 3), np.uint8))


def test_too_small_after_crop(butterfly: np.ndarray) -> None:
    assert np.isfinite(niqe(butterfly[:192, :96]))  # exactly two blocks is enough
    with pytest.raises(ImageTooSmall, match="got 172×76 after a border crop of 10"):
        niqe(butterfly[:192, :96], crop_border=10)


def test_crop_border_crops(butterfly: np.ndarray) -> None:
    assert niqe(butterfly, crop_border=4) == niqe(butterfly[4:-4, 4:-4])


@pytest.mark.parametrize("value", [0, 128, 255])
def test_flat_image_scores_finite_and_poor(value: int) -> None:
    """A constant image has no structure to fit (the MATLAB release gives NaN): it gets the same
    finite score whatever its grey level, worse than the natural images of the reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score = niqe(np.full((192, 288, 3), value, np.uint8))
    assert score == pytest.approx(30.3133, abs=1e-3)
    assert score > max(e["niqe"] for e in REFERENCE)


def test_one_textured_block_among_flat_ones_is_finite() -> None:
    image = np.full((192, 288, 3), 100, np.uint8)
    image[:96, :96] = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(niqe(image))


def test_greyscale_and_pil_inputs_agree_with_rgb(butterfly: np.ndarray) -> None:
    grey = np.asarray(Image.fromarray(butterfly).convert("L"))
    rgb_of_grey = np.repeat(grey[..., None], 3, axis=2)
    assert niqe(grey) == niqe(rgb_of_grey) == niqe(Image.fromarray(grey))
    assert niqe(Image.fromarray(butterfly)) == niqe(butterfly)


def test_rejects_non_8bit_input(butterfly: np.ndarray) -> None:
    with pytest.raises(TypeError, match="8-bit"):
        niqe(butterfly.astype(np.float32))


def test_fast_enough_for_every_evaluated_image() -> None:
    image = make_variant("CSet5/baby.png", "hr")  # 512×512
    assert image.shape == (512, 512, 3)
    niqe(image)  # warm-up: loads the pristine model
    start = time.perf_counter()
    niqe(image)
    assert time.perf_counter() - start < 1.0
