"""Hardened image input and output: from an untrusted HTTP body to an sRGB PIL image and back.

Everything here assumes hostile input. The body is counted while it streams in (a missing or
lying Content-Length does not help an attacker), the format is recognised from the bytes' magic
number before Pillow sees them (so only a handful of well-trodden decoders ever run), and the
pixel count is checked from the header — ``Image.open`` is lazy — before anything is decoded.
Failures become :mod:`service.errors` exceptions: 413 for too big, 415 for what is not an image
of a supported format, 400 for a supported format whose data is corrupt or truncated.

Decoded images are normalised to what the model expects: EXIF orientation applied, colours
converted to sRGB from an embedded ICC profile, and every pixel mode reduced to RGB, RGBA, L or
LA (alpha is kept: the pipeline upscales it separately). Of an animated or multi-page image only
the first frame is used; the number of frames left out is reported.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from .errors import (
    BadRequest,
    ClientClosedRequest,
    InvalidParameters,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from .settings import Settings

log = logging.getLogger("vpdsr.service")

OutputFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_QUALITY = 90
SUPPORTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"

# Magic numbers → Pillow format names that may open them (a JPEG may turn out to be an MPO).
_SIGNATURES: tuple[tuple[bytes, tuple[str, ...]], ...] = (
    (b"\x89PNG\r\n\x1a\n", ("PNG",)),
    (b"\xff\xd8\xff", ("JPEG", "MPO")),
    (b"GIF87a", ("GIF",)),
    (b"GIF89a", ("GIF",)),
    (b"BM", ("BMP",)),
    (b"II*\x00", ("TIFF",)),
    (b"MM\x00*", ("TIFF",)),
)
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_AS_RGB = ("CMYK", "YCbCr", "RGBX", "HSV")
_AS_RGBA = ("PA", "RGBa")


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # mode RGB, RGBA, L or LA, sRGB, upright
    format: str  # Pillow's name of the input format, e.g. "JPEG"
    frames_ignored: int  # frames after the first of an animated / multi-page input

    @property
    def default_output(self) -> OutputFormat:
        """JPEG in, JPEG out (a PNG of a photo is needlessly large); PNG otherwise."""
        return "jpeg" if self.format in ("JPEG", "MPO") else "png"


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may measure; checked from its header, before any pixel is decoded."""

    max_pixels: int
    max_side: int
    max_aspect: float

    @classmethod
    def of(cls, settings: Settings) -> ImageLimits:
        return cls(settings.max_pixels, settings.max_side, settings.max_aspect)

    def check(self, width: int, height: int) -> None:
        """413 for too many pixels; 422 for an extreme shape (a 200000×10 strip is a few KB of PNG)."""
        if width * height > self.max_pixels:
            raise PayloadTooLarge(
                f"image of {width}×{height} = {width * height} pixels exceeds the limit of {self.max_pixels} pixels"
            )
        if max(width, height) > self.max_side:
            raise InvalidParameters(f"image of {width}×{height}: a side exceeds the limit of {self.max_side} pixels")
        if max(width, height) > self.max_aspect * max(1, min(width, height)):
            raise InvalidParameters(
                f"image of {width}×{height}: aspect ratio exceeds the limit of {self.max_aspect:g}:1"
            )


@dataclass(frozen=True)
class Upload:
    """The image bytes of a request and, for a multipart form, its other (option) fields."""

    data: bytes
    fields: dict[str, str]


# -- reading the body ------------------------------------------------------------------------------
async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """Concatenate a body stream, failing as soon as it exceeds ``limit`` bytes."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


async def read_upload(request: Request, limit: int) -> Upload:
    """The image of a request: multipart field ``image`` or a raw ``image/*`` body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media_type == "multipart/form-data"
    if not (multipart or media_type.startswith("image/") or media_type == "application/octet-stream"):
        raise UnsupportedMediaType(
            f"content type {media_type or '(none)'!r} not accepted: send the image as a raw body with an "
            "image/* (or application/octet-stream) content type, or as multipart/form-data field 'image'"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    try:
        body = await read_limited(request.stream(), limit)
    except ClientDisconnect:
        raise ClientClosedRequest("client disconnected while sending the body") from None
    if not multipart:
        return Upload(body, {})
    return await _parse_form(request, body)


async def _parse_form(request: Request, body: bytes) -> Upload:
    async def replay() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=32).parse()
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart form: {exc.message}") from None
    try:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise InvalidParameters("multipart form needs a file field named 'image'")
        data = await image.read()
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    finally:
        await form.close()
    return Upload(data, fields)


# -- decoding --------------------------------------------------------------------------------------
def sniff_format(data: bytes) -> tuple[str, ...] | None:
    """Pillow format names for the bytes' magic number, or None for anything unsupported."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP",)
    return next((formats for magic, formats in _SIGNATURES if data.startswith(magic)), None)


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Untrusted bytes → an upright sRGB image, or a 400 / 413 / 415 / 422 error."""
    if not data:
        raise BadRequest("empty body: send the image bytes")
    formats = sniff_format(data)
    if formats is None:
        raise UnsupportedMediaType(f"not a supported image format: send {SUPPORTED}")
    kind = formats[0]
    with warnings.catch_warnings():
        # Pillow's own bomb check warns above 89 Mpx and raises above twice that; ours is stricter
        # and comes first, so only the error (for absurd sizes that it raises in open) matters.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(formats))
            limits.check(*image.size)
            found = image.format or kind
            frames = getattr(image, "n_frames", 1)
            image.seek(0)
            image.load()
            upright = to_srgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError as exc:
            raise PayloadTooLarge(str(exc)) from None
        except ServiceError:
            raise
        except Exception as exc:  # Pillow signals corrupt data with many exception types
            raise BadRequest(f"corrupt or truncated {kind} image: {exc}") from None
    return DecodedImage(upright, found, max(0, frames - 1))


def to_srgb(image: Image.Image) -> Image.Image:
    """Any supported pixel mode → RGB, RGBA, L or LA in sRGB (alpha kept)."""
    if image.mode in _SIXTEEN_BIT:
        # Pillow's convert("L") clips 16-bit values instead of scaling them.
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
        raise UnsupportedMediaType(f"unsupported pixel mode {image.mode}: send RGB, greyscale, palette or CMYK")
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


# -- encoding --------------------------------------------------------------------------------------
def encode_image(image: Image.Image, fmt: OutputFormat, quality: int | None = None) -> bytes:
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
