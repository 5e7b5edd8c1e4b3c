"""SRPipeline on real images: sizes, modes, seeds, and seamless tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model import InvalidRequest, SRPipeline
from model.pipeline import split_alpha
from model.tiling import TileGrid, tile_starts
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def pipe(tiny_registry) -> SRPipeline:
    return SRPipeline.from_registry("tiny@production", tiny_registry)


def photo() -> Image.Image:
    return Image.open(FIXTURES / "realset" / "bears.jpg").convert("RGB")


def test_upscales_real_photo_by_four(pipe: SRPipeline) -> None:
    image = photo()
    out = pipe(image, seed=1)
    assert out.mode == "RGB" and out.size == (image.width * 4, image.height * 4)


def test_seed_reproduces_and_changes(pipe: SRPipeline) -> None:
    image = photo().crop((0, 0, 40, 24))
    a, b, c = (np.asarray(pipe(image, seed=s)) for s in (7, 7, 8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(("mode", "size"), [("L", (13, 9)), ("RGBA", (20, 17)), ("LA", (8, 8)), ("P", (30, 5))])
def test_image_modes_and_odd_sizes(pipe: SRPipeline, mode: str, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]  # a smooth alpha ramp
    rgba = Image.fromarray(rgba, "RGBA")
    image = rgba.convert(mode)
    out = pipe(image, seed=0)
    assert out.size == (size[0] * 4, size[1] * 4)
    expected = {"L": "L", "RGBA": "RGBA", "LA": "LA", "P": "RGB"}[mode]
    assert out.mode == expected
    if mode == "RGBA":
        alpha_in = np.asarray(image.getchannel("A"), dtype=np.float32)
        alpha_out = np.asarray(out.getchannel("A").resize(size, Image.Resampling.BOX), dtype=np.float32)
        assert np.abs(alpha_in - alpha_out).max() < 8


def test_uint8_array_input(pipe: SRPipeline) -> None:
    arr = np.asarray(photo().crop((0, 0, 16, 16)))
    assert pipe(arr, seed=0).size == (64, 64)
    with pytest.raises(InvalidRequest):
        pipe(arr.astype(np.float32))


def test_bad_options_are_rejected(pipe: SRPipeline) -> None:
    with pytest.raises(InvalidRequest):
        pipe(photo(), steps=16)
    with pytest.raises(InvalidRequest):
        pipe(photo(), tile=12)


def test_tile_starts_cover_with_overlap() -> None:
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 68
    assert all(b - a <= 24 for a, b in zip(starts, starts[1:]))
    assert tile_starts(32, 32, 8) == [0]


def test_blend_of_constant_tiles_is_exact() -> None:
    grid = TileGrid(height=40, width=72, tile=16, overlap=4, scale=4)
    out = grid.blend([torch.full((3, 64, 64), 0.5) for _ in grid.boxes])
    assert out.shape == (3, 160, 288)
    torch.testing.assert_close(out, torch.full_like(out, 0.5))


def test_16_bit_greyscale_is_rescaled_not_clipped(pipe: SRPipeline) -> None:
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    rgb, grayscale, _ = split_alpha(Image.fromarray(ramp))
    assert grayscale
    values = np.asarray(rgb)[..., 0]
    assert values.min() == 0 and values.max() == 255 and np.all(np.diff(values.ravel().astype(int)) >= 0)
