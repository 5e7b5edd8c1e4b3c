"""One image policy (model.images) for `vpdsr upscale` and the service: a local run and a run on a
real server give the same image for a Display P3 photo and for an image with alpha written as JPEG."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from model.cli import main
from model.images import ImageLimits
from service.settings import Settings
from tests.conftest import FIXTURES, free_port
from tests.live import live_server

P3_PHOTO = FIXTURES / "service" / "bike-display-p3.jpg"
OPTIONS = ["--seed", "7", "--tile", "16"]  # the same noise and tiling on both sides


@pytest.fixture(scope="module")
def url(tiny_registry: Path) -> Iterator[str]:
    # Batches of 4 tiles, as the local pipeline runs them (SRPipeline.max_tile_batch): the same
    # batch compositions give bit-identical results (docs/service.md, "Reproducibility").
    settings = Settings(registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(),
                        max_batch_size=4)
    with live_server(settings, torch_threads=1) as base:
        yield base


def upscale(source: Path, target: Path, *where: str) -> np.ndarray:
    assert main(["upscale", str(source), str(target), *OPTIONS, *where]) == 0
    with Image.open(target) as result:
        return np.asarray(result.convert("RGBA" if result.mode in ("RGBA", "LA") else "RGB"), dtype=int)


def test_display_p3_photo_local_and_served_alike_in_srgb(
    tmp_path: Path, tiny_registry: Path, url: str
) -> None:
    local = ["--model", "tiny@production", "--registry", str(tiny_registry), "--device", "cpu"]
    here = upscale(P3_PHOTO, tmp_path / "local.png", *local)
    served = upscale(P3_PHOTO, tmp_path / "served.png", "--server", url)
    assert np.array_equal(here, served)

    # What the policy means: the colours converted to sRGB, as a copy converted beforehand gives;
    # the same pixel values taken as sRGB (the profile ignored) give another image.
    with Image.open(P3_PHOTO) as raw:
        raw.load()
        profile = ImageCms.ImageCmsProfile(io.BytesIO(raw.info["icc_profile"]))
        srgb = ImageCms.profileToProfile(raw, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
        Image.fromarray(np.asarray(raw)).save(tmp_path / "ignored.png")  # the pixels without the profile
    srgb.save(tmp_path / "srgb.png")
    assert np.array_equal(here, upscale(tmp_path / "srgb.png", tmp_path / "srgb_x4.png", *local))
    assert np.abs(here - upscale(tmp_path / "ignored.png", tmp_path / "ignored_x4.png", *local)).max() > 5


def test_alpha_written_as_jpeg_local_and_served_alike_on_white(
    tmp_path: Path, tiny_registry: Path, url: str
) -> None:
    """A PNG with a transparent half, upscaled to JPEG: composited onto white on both sides (not
    the arbitrary colours under the transparent pixels)."""
    with Image.open(FIXTURES / "service" / "butterfly.png") as photo:
        rgba = photo.convert("RGBA")
    alpha = np.full((rgba.height, rgba.width), 255, dtype=np.uint8)
    alpha[:, : rgba.width // 2] = 0
    rgba.putalpha(Image.fromarray(alpha, "L"))
    source = tmp_path / "half-transparent.png"
    rgba.save(source)

    local = ["--model", "tiny@production", "--registry", str(tiny_registry), "--device", "cpu"]
    here = upscale(source, tmp_path / "local.jpg", *local)
    served = upscale(source, tmp_path / "served.jpg", "--server", url)
    assert (tmp_path / "local.jpg").read_bytes() == (tmp_path / "served.jpg").read_bytes()
    assert here.shape == served.shape == (4 * rgba.height, 4 * rgba.width, 3)
    transparent = here[:, : 4 * rgba.width // 2 - 8]  # clear of the bicubic edge of the alpha
    assert transparent.min() >= 250, "transparent pixels must come out white"


def test_the_cli_limits_are_the_services_defaults() -> None:
    settings = Settings()
    assert ImageLimits() == ImageLimits(settings.max_pixels, settings.max_side, settings.max_aspect)
