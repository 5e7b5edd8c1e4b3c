"""The one image policy of ``vpdsr upscale`` (local or ``--server``) and of the HTTP service.

Both read and write images through this module, so a photo gives the same result whichever of
them runs it (a Display P3 photo must not come out in other colours because it was upscaled
locally). Reading: the first frame only, EXIF orientation applied, colours converted to sRGB from
an embedded ICC profile, 16-bit greyscale scaled (not clipped) to 8 bits, and every pixel mode
reduced to RGB, RGBA, L or LA; alpha is kept, the pipeline upscales it separately. Writing: PNG
and WebP keep alpha; JPEG has none, so the image is composited onto white (the colours under
fully transparent pixels are arbitrary and must not show). The size limits are checked from the
header, before any pixel is decoded: a 500 KB PNG can claim 13000² pixels.

Format sniffing, body limits and decode budgets of untrusted HTTP input stay in
:mod:`service.imageio`; this module is what both sides must agree on.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageCms, ImageOps

from .errors import InvalidRequest

log = logging.getLogger("vpdsr.images")

OutputFormat = Literal["png", "jpeg", "webp"]
DEFAULT_QUALITY = 90  # JPEG and WebP
# What a local read may open: the formats the service accepts (Pillow names; a JPEG may be an MPO).
READ_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "TIFF", "WEBP")

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_AS_RGB = ("CMYK", "YCbCr", "RGBX", "HSV")
_AS_RGBA = ("PA", "RGBa")


class ImageRefused(InvalidRequest):
    """An image outside the limits; ``setting`` names the limit (an :class:`ImageLimits` field)."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


class ImageTooLarge(ImageRefused):
    """More pixels than ``max_pixels`` (the service answers 413, the other refusals 422)."""


class UnsupportedImage(InvalidRequest):
    """A pixel mode the model cannot take (e.g. floating-point TIFF)."""


class UnreadableImage(InvalidRequest):
    """A file that is not an image of a supported format, or whose data is corrupt."""


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may measure. The defaults are the service's (``VPDSR_MAX_PIXELS``,
    ``VPDSR_MAX_SIDE``, ``VPDSR_MAX_ASPECT``): an input of 4096² already makes a 16384² result."""

    max_pixels: int = 4096 * 4096
    max_side: int = 8192
    max_aspect: float = 32
    max_jpeg_scans: int = 100

    def check(self, width: int, height: int) -> None:
        """Refuse too many pixels, a too long side or an extreme shape (a 200000×10 strip is a few
        KB of PNG)."""
        if width * height > self.max_pixels:
            raise ImageTooLarge(
                f"image of {width}×{height} = {width * height} pixels exceeds the limit of {self.max_pixels} pixels",
                "max_pixels",
            )
        if max(width, height) > self.max_side:
            raise ImageRefused(
                f"image of {width}×{height}: a side exceeds the limit of {self.max_side} pixels", "max_side"
            )
        if max(width, height) > self.max_aspect * max(1, min(width, height)):
            raise ImageRefused(
                f"image of {width}×{height}: aspect ratio exceeds the limit of {self.max_aspect:g}:1", "max_aspect"
            )

    def check_jpeg(self, data: bytes) -> None:
        """Refuse a JPEG of more scans than ``max_jpeg_scans``, from its markers alone: each scan of
        a progressive JPEG is a pass over every pixel, so a few hundred KB of tiny refinement
        scans cost minutes of CPU to decode (usual progressive files have about ten)."""
        scans = jpeg_scans(data)
        if scans > self.max_jpeg_scans:
            raise ImageTooLarge(
                f"JPEG of {scans} scans exceeds the limit of {self.max_jpeg_scans}: save it as a baseline JPEG",
                "max_jpeg_scans",
            )


def jpeg_scans(data: bytes) -> int:
    """The scans of a JPEG stream: its start-of-scan markers. Entropy-coded data stuffs every 0xFF
    byte with a 0x00, so 0xFFDA occurs only as a marker (an embedded EXIF thumbnail adds its own)."""
    return data.count(b"\xff\xda")


def tiff_pages(data: bytes, cap: int) -> int:
    """The pages of a classic TIFF, from its chain of image file directories, counted up to ``cap``.
    Pillow's own count seeks through every page and grows faster than linearly (32k pages: 6 CPU-s);
    only the first page is used, so the count only says how many were left out."""
    order = "little" if data[:2] == b"II" else "big"
    offset, pages, seen = int.from_bytes(data[4:8], order), 0, set()
    while 8 <= offset <= len(data) - 2 and offset not in seen and pages < cap:
        seen.add(offset)
        pages += 1
        entries = int.from_bytes(data[offset:offset + 2], order)
        next_at = offset + 2 + 12 * entries
        offset = int.from_bytes(data[next_at:next_at + 4], order) if next_at + 4 <= len(data) else 0
    return max(pages, 1)


def read_file(path: Path, limits: ImageLimits) -> Image.Image:
    """A local image file as the service would take it: limits checked from the header, then the
    first frame decoded and passed through :func:`normalize`."""
    with warnings.catch_warnings():
        # Pillow warns above 89 Mpx; ImageLimits is the check that counts (and comes first).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data), formats=READ_FORMATS) as image:
                limits.check(*image.size)
                if image.format in ("JPEG", "MPO"):
                    limits.check_jpeg(data)
                image.seek(0)
                image.load()
                return normalize(image)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(str(exc), "max_pixels") from None
        except InvalidRequest:
            raise
        except Exception as exc:  # Pillow signals unknown formats and corrupt data with many types
            raise UnreadableImage(f"cannot read it as an image: {exc}") from None


def normalize(image: Image.Image) -> Image.Image:
    """A decoded image → upright, sRGB, mode RGB, RGBA, L or LA (alpha kept)."""
    return to_srgb(ImageOps.exif_transpose(image))


def to_srgb(image: Image.Image) -> Image.Image:
    """Any supported pixel mode → RGB, RGBA, L or LA in sRGB (alpha kept)."""
    if image.mode in _SIXTEEN_BIT:
        # Pillow's convert("L") clips 16-bit values instead of scaling them. (numpy only here: the
        # command line imports this module for its limits, and `vpdsr --help` should not wait for it.)
        import numpy as np

        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "L")
    icc = image.info.get("icc_profile")
    if icc and image.mode in ("RGB", "RGBA", "CMYK"):
        image = _apply_icc(image, icc)
    if image.mode in ("1", "L", "P", "RGB") and image.has_transparency_data:
        image = image.convert("LA" if image.mode in ("1", "L") else "RGBA")
    elif image.mode in ("1", "La"):
        image = image.convert("L" if image.mode == "1" else "LA")
    elif image.mode in ("P", *_AS_RGB):
        image = image.convert("RGB")
    elif image.mode in _AS_RGBA:
        image = image.convert("RGBA")
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        raise UnsupportedImage(f"unsupported pixel mode {image.mode}: send RGB, greyscale, palette or CMYK")
    return image


def _apply_icc(image: Image.Image, icc: bytes) -> Image.Image:
    """Convert from the embedded profile to sRGB; a broken profile is ignored, not fatal."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(image, source, _SRGB, outputMode=mode)
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        log.warning("ignoring unusable ICC profile: %s", exc)
        return image
    assert converted is not None
    return converted


def encode(image: Image.Image, fmt: OutputFormat, quality: int | None = None) -> bytes:
    """PNG (lossless, alpha), JPEG (alpha composited onto white) or WebP (alpha kept)."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, "PNG")
    elif fmt == "jpeg":
        if image.mode in ("RGBA", "LA"):
            base = Image.new(image.mode[:-1], image.size, "white")
            base.paste(image.convert(image.mode[:-1]), mask=image.getchannel("A"))
            image = base
        image.save(buffer, "JPEG", quality=quality or DEFAULT_QUALITY)
    else:
        image.save(buffer, "WEBP", quality=quality or DEFAULT_QUALITY)
    return buffer.getvalue()
