"""Hardened image input and output: from an untrusted HTTP body to an sRGB PIL image and back.

Everything here assumes hostile input. The body is counted while it streams in (a missing or
lying Content-Length does not help an attacker), the format is recognised from the bytes' magic
number before Pillow sees them (so only a handful of well-trodden decoders ever run), and the
pixel count is checked from the header — ``Image.open`` is lazy — before anything is decoded.
Failures become :mod:`service.errors` exceptions: 413 for too big, 415 for what is not an image
of a supported format, 400 for a supported format whose data is corrupt or truncated.

Decoded images are normalised, and results encoded, by :mod:`model.images`: the image policy
that ``vpdsr upscale`` applies too, so a local run and a run on the service give the same image
(EXIF orientation, ICC profile to sRGB, alpha kept, JPEG output composited onto white). Of an
animated or multi-page image only the first frame is used; the number of frames left out is
reported.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from model import images
from model.images import OutputFormat

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

encode_image = images.encode  # results are encoded by the shared policy (service.upscale calls it so)
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SUPPORTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"
MAX_PAGES_COUNTED = 1000  # of a multi-page TIFF: only the first is used, the rest are counted up to this

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


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # mode RGB, RGBA, L or LA, sRGB, upright
    format: str  # Pillow's name of the input format, e.g. "JPEG"
    frames_ignored: int  # frames after the first of an animated / multi-page input

    @property
    def default_output(self) -> OutputFormat:
        """JPEG in, JPEG out (a PNG of a photo is needlessly large); PNG otherwise."""
        return "jpeg" if self.format in ("JPEG", "MPO") else "png"


class ImageLimits(images.ImageLimits):
    """The settings' limits of :class:`model.images.ImageLimits`, as HTTP errors."""

    @classmethod
    def of(cls, settings: Settings) -> ImageLimits:
        return cls(settings.max_pixels, settings.max_side, settings.max_aspect, settings.max_jpeg_scans)

    def check(self, width: int, height: int) -> None:
        """413 for too many pixels; 422 for a too long side or an extreme shape."""
        try:
            super().check(width, height)
        except images.ImageTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from None
        except images.ImageRefused as exc:
            raise InvalidParameters(str(exc)) from None

    def check_jpeg(self, data: bytes) -> None:
        """413 for a JPEG of too many scans."""
        try:
            super().check_jpeg(data)
        except images.ImageTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from None


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
    """Untrusted bytes → an upright sRGB image, or a 400 / 413 / 415 / 422 error. What the header
    tells (size, JPEG scans, TIFF pages) is checked before any pixel is decoded; the decode itself
    runs where it can be stopped (:mod:`service.decoding`)."""
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
            if found in ("JPEG", "MPO"):
                limits.check_jpeg(data)
            frames = images.tiff_pages(data, MAX_PAGES_COUNTED) if found == "TIFF" else getattr(image, "n_frames", 1)
            image.seek(0)
            image.load()
            upright = images.normalize(image)
        except Image.DecompressionBombError:
            raise PayloadTooLarge(f"image too large to decode: over {limits.max_pixels} pixels") from None
        except images.UnsupportedImage as exc:
            raise UnsupportedMediaType(str(exc)) from None
        except ServiceError:
            raise
        except Exception as exc:  # Pillow signals corrupt data with many exception types
            # Pillow's text can hold object reprs and internals: the log has it, the client a sentence.
            log.info("corrupt %s upload: %s", kind, exc)
            raise BadRequest(f"corrupt or truncated {kind} image: it could not be decoded") from None
    return DecodedImage(upright, found, max(0, frames - 1))
