"""Hostile and unusual inputs: every one gets its documented 4xx or a correct image, never a 500."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageCms

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.imageio import ImageLimits, decode_image, encode_image
from service.settings import Settings
from tests.conftest import FIXTURES, free_port
from tests.live import live_server, scrape

PHOTOS = FIXTURES / "service"
MAX_BODY = 64 * 1024
MAX_PIXELS = 256 * 256
LIMITS = ImageLimits(MAX_PIXELS, max_side=4096, max_aspect=32)


@pytest.fixture(scope="module")
def url(tiny_registry: Path) -> Iterator[str]:
    settings = Settings(
        registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(),
        max_batch_size=2, max_delay_ms=5, max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS,
    )
    with live_server(settings, torch_threads=1) as base:
        yield base


# -- building inputs -------------------------------------------------------------------------------
def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode) if mode != "CMYK" else 4
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` pixels, followed by a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(64)))


def gif_header(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims ``width × height`` pixels, with one 1×1 frame."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def rgba_with_gradient() -> Image.Image:
    image = noise(32, 16, "RGBA")
    alpha = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 1))
    image.putalpha(Image.fromarray(alpha, "L"))
    return image


def palette_with_transparency() -> Image.Image:
    indices = np.zeros((16, 16), dtype=np.uint8)
    indices[:, 8:] = 1  # left half: index 0 (transparent), right half: index 1 (red)
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    return image


def exif_rotated_jpeg() -> bytes:
    """Stored 32×16 (landscape) with EXIF orientation 6: displayed 16×32 (portrait)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(noise(32, 16), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png() -> bytes:
    ramp = np.linspace(0, 65535, 24 * 16).reshape(16, 24).astype(np.uint16)
    return encoded(Image.fromarray(ramp), "PNG")


PHOTO_PNG = encoded(noise(32, 32), "PNG")
PHOTO_JPEG = encoded(noise(32, 32), "JPEG")


# -- the corpus ------------------------------------------------------------------------------------
REJECTED: list[tuple[str, bytes, str | None, int, str]] = [
    ("truncated PNG", PHOTO_PNG[: len(PHOTO_PNG) // 2], "image/png", 400, "bad_request"),
    ("truncated JPEG", PHOTO_JPEG[: len(PHOTO_JPEG) // 2], "image/jpeg", 400, "bad_request"),
    ("PNG signature only", PHOTO_PNG[:8], "image/png", 400, "bad_request"),
    ("JPEG magic then garbage", b"\xff\xd8\xff" + bytes(range(256)) * 4, "image/jpeg", 400, "bad_request"),
    ("zero bytes", b"", "image/png", 400, "bad_request"),
    ("text body as image", b"hello, I am not an image", "image/png", 415, "unsupported_media_type"),
    ("valid PNG, wrong content type", PHOTO_PNG, "text/plain", 415, "unsupported_media_type"),
    ("valid PNG, no content type", PHOTO_PNG, None, 415, "unsupported_media_type"),
    ("JSON body", b'{"image": "x"}', "application/json", 415, "unsupported_media_type"),
    ("SVG", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml", 415, "unsupported_media_type"),
    ("PNG header of 100000x100000", png_header(100_000, 100_000), "image/png", 413, "payload_too_large"),
    ("PNG header over max_pixels", png_header(1000, 1000), "image/png", 413, "payload_too_large"),
    ("GIF header of 65535x65535", gif_header(65535, 65535), "image/gif", 413, "payload_too_large"),
    ("body over the byte limit", bytes(MAX_BODY + 1), "image/png", 413, "payload_too_large"),
    ("PNG header of 2000x10 (aspect ratio)", png_header(2000, 10), "image/png", 422, "invalid_parameter"),
    ("PNG header of 9000x4 (side)", png_header(9000, 4), "image/png", 422, "invalid_parameter"),
    ("multipart without boundary", b"--x\r\n", "multipart/form-data", 400, "bad_request"),
]


@pytest.mark.parametrize(("data", "content_type", "status", "code"), [case[1:] for case in REJECTED],
                         ids=[case[0] for case in REJECTED])
def test_rejected_with_clear_error(
    client: httpx.Client, data: bytes, content_type: str | None, status: int, code: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/upscale", content=data, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_chunked_body_over_limit_without_content_length(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(4 * MAX_BODY // 8192):
            yield bytes(8192)

    response = client.post("/v1/upscale", content=chunks(), headers={"content-type": "image/png"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    "files",
    [{"picture": ("a.png", PHOTO_PNG, "image/png")}, {"image": (None, "not a file"), "scale": (None, "2")}],
    ids=["wrong field name", "image as a text field"],
)
def test_multipart_without_image_file(client: httpx.Client, files: dict) -> None:
    response = client.post("/v1/upscale", files=files)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_parameter"
    assert "'image'" in response.json()["error"]["message"]


Check = Callable[[Image.Image], None]


def same_alpha(source: Image.Image) -> Check:
    def check(result: Image.Image) -> None:
        assert result.mode == "RGBA"
        expected = np.asarray(source.getchannel("A").resize(result.size, Image.Resampling.BICUBIC), dtype=float)
        assert np.abs(np.asarray(result.getchannel("A"), dtype=float) - expected).mean() < 2

    return check


def transparent_left_half(result: Image.Image) -> None:
    assert result.mode == "RGBA"
    alpha = np.asarray(result.getchannel("A"))
    assert alpha[:, :24].max() <= 16 and alpha[:, 40:].min() >= 240


ACCEPTED: list[tuple[str, bytes, str, str, tuple[int, int], str, Check | None]] = [
    # name, body, content type, output media type, output size, output mode, extra check
    ("CMYK JPEG", encoded(noise(24, 16, "CMYK"), "JPEG"), "image/jpeg", "image/jpeg", (96, 64), "RGB", None),
    ("greyscale JPEG", encoded(noise(24, 16, "L"), "JPEG"), "image/jpeg", "image/jpeg", (96, 64), "L", None),
    ("16-bit PNG", sixteen_bit_png(), "image/png", "image/png", (96, 64), "L", None),
    ("EXIF-rotated JPEG", exif_rotated_jpeg(), "image/jpeg", "image/jpeg", (64, 128), "RGB", None),
    ("RGBA PNG", encoded(rgba_with_gradient(), "PNG"), "image/png", "image/png", (128, 64), "RGBA",
     same_alpha(rgba_with_gradient())),
    ("palette PNG with transparency", encoded(palette_with_transparency(), "PNG"), "image/png", "image/png",
     (64, 64), "RGBA", transparent_left_half),
    ("WebP", encoded(noise(16, 16), "WEBP"), "image/webp", "image/png", (64, 64), "RGB", None),
    ("BMP", encoded(noise(16, 16), "BMP"), "image/bmp", "image/png", (64, 64), "RGB", None),
    ("TIFF", encoded(noise(16, 16), "TIFF"), "image/tiff", "image/png", (64, 64), "RGB", None),
    ("octet-stream PNG", PHOTO_PNG, "application/octet-stream", "image/png", (128, 128), "RGB", None),
    ("Display P3 photo", (PHOTOS / "bike-display-p3.jpg").read_bytes(), "image/jpeg", "image/jpeg", (160, 120),
     "RGB", None),
]


@pytest.mark.parametrize(("data", "content_type", "media_type", "size", "mode", "check"),
                         [case[1:] for case in ACCEPTED], ids=[case[0] for case in ACCEPTED])
def test_unusual_images_come_back_correct(
    client: httpx.Client, data: bytes, content_type: str, media_type: str, size: tuple[int, int], mode: str,
    check: Check | None,
) -> None:
    response = client.post("/v1/upscale", content=data, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    result = Image.open(io.BytesIO(response.content))
    assert (result.size, result.mode) == (size, mode)
    if check is not None:
        check(result)


def test_animated_gif_uses_first_frame(client: httpx.Client) -> None:
    response = client.post("/v1/upscale", content=animated_gif(), headers={"content-type": "image/gif"})
    assert response.status_code == 200, response.text
    assert response.headers["x-frames-ignored"] == "2"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)


def test_alpha_as_jpeg_is_flattened_onto_white(client: httpx.Client) -> None:
    response = client.post(
        "/v1/upscale", content=encoded(palette_with_transparency(), "PNG"), params={"format": "jpeg"},
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200
    result = np.asarray(Image.open(io.BytesIO(response.content)))
    assert result.shape == (64, 64, 3) and result[:, :20].min() > 200  # transparent half → white


def test_server_keeps_serving_and_never_answered_5xx(client: httpx.Client, url: str) -> None:
    # Run last in this module: after the whole corpus above.
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/upscale", content=PHOTO_PNG, headers={"content-type": "image/png"}).status_code == 200
    statuses = {
        dict(labels)["status"]
        for name, labels in scrape(url)
        if name == "vpdsr_requests_total" and dict(labels)["route"] != "/readyz"  # 503 while warming up
    }
    assert {"200", "400", "413", "415", "422"} <= statuses
    assert not any(status.startswith("5") for status in statuses), statuses


# -- decoding, without HTTP ------------------------------------------------------------------------
def test_icc_profile_is_converted_to_srgb() -> None:
    data = (PHOTOS / "bike-display-p3.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as raw:
        raw.load()
        profile = ImageCms.ImageCmsProfile(io.BytesIO(raw.info["icc_profile"]))
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        expected = np.asarray(ImageCms.profileToProfile(raw, profile, srgb, outputMode="RGB"), dtype=int)
        untouched = np.asarray(raw, dtype=int)
    decoded = np.asarray(decode_image(data, LIMITS).image, dtype=int)
    assert np.array_equal(decoded, expected)
    assert np.abs(decoded - untouched).max() > 5  # P3 → sRGB really changed the colours


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    decoded = decode_image(encoded(Image.fromarray(ramp), "PNG"), LIMITS)
    assert decoded.image.mode == "L"
    assert np.asarray(decoded.image).tolist() == [[0, 1, 128, 255]]


@pytest.mark.parametrize(
    ("data", "error"),
    [(b"", BadRequest), (b"GIF89a", BadRequest), (b"%PDF-1.7", UnsupportedMediaType), (png_header(300, 300), PayloadTooLarge)],
)
def test_decode_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_image(data, LIMITS)


def test_default_output_format_follows_input() -> None:
    assert decode_image(PHOTO_JPEG, LIMITS).default_output == "jpeg"
    assert decode_image(PHOTO_PNG, LIMITS).default_output == "png"
    assert Image.open(io.BytesIO(encode_image(rgba_with_gradient(), "webp"))).mode == "RGBA"


def test_extreme_shape_is_refused_from_the_header_alone() -> None:
    """Red team: a 2 KB PNG of 200000×10 was decoded, tiled and computed for a minute, then 504."""
    from service.errors import InvalidParameters
    from service.settings import Settings

    started = time.perf_counter()
    with pytest.raises(InvalidParameters, match="exceeds the limit of 8192"):
        decode_image(png_header(200_000, 10), ImageLimits.of(Settings()))
    assert time.perf_counter() - started < 0.5
