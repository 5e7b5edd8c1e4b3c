"""An upscale request, from its bytes and options to the encoded result: the one path that both
``POST /v1/upscale`` (:mod:`service.routes.upscale`) and the job processor
(:mod:`service.jobs.processor`) take, whatever transport brought the request.

Also here, because both endpoints that take an upscale request share them: the OpenAPI request
body (:data:`REQUEST_BODY`), options sent as multipart form fields (:func:`merge_form_fields`)
and their conversion to the engine's options (:func:`to_options`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .batcher import Priority
from .decoding import decode
from .engine import InferenceEngine, Progress, UpscaleOptions
from .failures import InvalidOptions
from .imageio import MEDIA_TYPES, OutputFormat, encode_image
from .schemas import UpscaleJSON, UpscaleParams
from .settings import Settings

BINARY = {"schema": {"type": "string", "format": "binary"}}  # an OpenAPI body or answer of raw bytes
_INPUT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff", "application/octet-stream")


def _form_field(schema: dict[str, Any]) -> dict[str, Any]:
    """An option's query schema as a form field's: a field is sent or left out, never null, so the
    ``{"type": "null"}`` alternative and the ``null`` default go."""
    field = {key: value for key, value in schema.items() if key != "anyOf" and not (key == "default" and value is None)}
    variants = [variant for variant in schema.get("anyOf", ()) if variant.get("type") != "null"]
    if len(variants) == 1:
        field |= variants[0]
    elif variants:
        field["anyOf"] = variants
    return field


# The OpenAPI request body of POST /v1/upscale and POST /v1/jobs (FastAPI cannot infer it: the
# body is read raw, see service.imageio.read_upload).
REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "the image: a raw body with an image content type, or multipart/form-data field `image` "
    "(the options may then also be form fields). PNG, JPEG, WebP, GIF, BMP or TIFF; of an animated or "
    "multi-page image only the first frame is used.",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "the image file"},
                    **{
                        name: _form_field(schema)
                        for name, schema in UpscaleParams.model_json_schema()["properties"].items()
                    },
                },
            }
        },
        **{media_type: BINARY for media_type in _INPUT_TYPES},
    },
}


@dataclass(frozen=True)
class Upscaled:
    """An encoded result: what ``/v1/upscale`` answers, and what a background job stores."""

    body: bytes
    format: OutputFormat
    width: int
    height: int
    seed: int
    steps: int
    model: str
    version: str
    queue_ms: float
    compute_ms: float
    frames_ignored: int

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    @property
    def headers(self) -> dict[str, str]:
        return {
            "X-Model": self.model,
            "X-Model-Version": self.version,
            "X-Seed": str(self.seed),
            "X-Steps": str(self.steps),
            "X-Queue-Time-Ms": str(self.queue_ms),
            "X-Compute-Time-Ms": str(self.compute_ms),
            "X-Frames-Ignored": str(self.frames_ignored),
        }

    def meta(self) -> dict[str, Any]:
        """Everything but the bytes, JSON-serialisable (the headers included)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "body"}
        return fields | {"headers": self.headers}

    def json(self) -> UpscaleJSON:
        return UpscaleJSON(
            model=self.model,
            version=self.version,
            width=self.width,
            height=self.height,
            format=self.format,
            seed=self.seed,
            steps=self.steps,
            queue_ms=self.queue_ms,
            compute_ms=self.compute_ms,
            image_base64=base64.b64encode(self.body).decode("ascii"),
        )


def to_options(params: UpscaleParams) -> UpscaleOptions:
    return UpscaleOptions(model=params.model, steps=params.steps, seed=params.seed, tile=params.tile,
                          scale=params.scale)


def merge_form_fields(params: UpscaleParams, fields: dict[str, str]) -> UpscaleParams:
    """Options from multipart form fields, over those from the query string."""
    given = {name: value for name, value in fields.items() if name in UpscaleParams.model_fields}
    if not given:
        return params
    try:
        return UpscaleParams.model_validate(params.model_dump(exclude_unset=True) | given)
    except ValidationError as exc:
        errors = [dict(err, loc=("form", *err["loc"])) for err in exc.errors(include_url=False)]
        raise InvalidOptions.from_errors(errors) from None


async def run_upscale(
    engine: InferenceEngine,
    settings: Settings,
    data: bytes,
    params: UpscaleParams,
    *,
    priority: Priority = Priority.INTERACTIVE,
    deadline: float | None = None,
    progress: Progress | None = None,
) -> Upscaled:
    """Image bytes + options → encoded result: the one path of synchronous requests and jobs.
    ``deadline`` (``time.monotonic()``, None: no limit — a job's wait for capacity is not a failure)
    and ``progress(tiles done, tiles in total)`` go to :meth:`InferenceEngine.upscale`, which also
    checks the options."""
    decoded = await decode(data, settings)
    result = await engine.upscale(decoded.image, to_options(params), priority=priority, deadline=deadline,
                                  progress=progress)
    fmt = params.format or decoded.default_output
    body = await asyncio.to_thread(encode_image, result.image, fmt, params.quality)
    return Upscaled(
        body=body,
        format=fmt,
        width=result.image.width,
        height=result.image.height,
        seed=result.seed,
        steps=result.steps,
        model=result.model,
        version=result.version,
        queue_ms=round(result.queue_seconds * 1000, 1),
        compute_ms=round(result.compute_seconds * 1000, 1),
        frames_ignored=decoded.frames_ignored,
    )
