"""An upscale request, from its bytes and options to the encoded result: the one path that both
``POST /v1/upscale`` (:mod:`service.routes.upscale`) and the job processor
(:mod:`service.jobs.processor`) take, whatever transport brought the request.

Also here, because both endpoints that take an upscale request share them: the OpenAPI request
body (:data:`REQUEST_BODY`) and options sent as multipart form fields (:func:`merge_form_fields`).
The options are one type from the request to the engine and into a job record
(:class:`~service.schemas.UpscaleOptions`); a result is described by one type too
(:class:`ResultMeta`), in the answer's headers and JSON and in the job record beside the result.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .batcher import Priority
from .decoding import decode
from .engine import InferenceEngine, Progress
from .failures import InvalidOptions
from .imageio import MEDIA_TYPES, OutputFormat, encode_image
from .schemas import UpscaleJSON, UpscaleOptions
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
                        for name, schema in UpscaleOptions.model_json_schema()["properties"].items()
                    },
                },
            }
        },
        **{media_type: BINARY for media_type in _INPUT_TYPES},
    },
}


class ResultMeta(BaseModel):
    """An encoded result without its bytes: what ``/v1/upscale`` says of it in its ``X-*`` headers,
    and what a job stores beside its result (``result_meta``), read back for the job's status and
    the headers of its result."""

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


@dataclass(frozen=True)
class Upscaled:
    """An encoded result: what ``/v1/upscale`` answers, and what a background job stores."""

    body: bytes
    meta: ResultMeta

    def json(self) -> UpscaleJSON:
        """The answer with ``Accept: application/json``: the result's description and its bytes."""
        return UpscaleJSON(**self.meta.model_dump(exclude={"frames_ignored"}),
                           image_base64=base64.b64encode(self.body).decode("ascii"))


def merge_form_fields(params: UpscaleOptions, fields: dict[str, str]) -> UpscaleOptions:
    """Options from multipart form fields, over those from the query string."""
    given = {name: value for name, value in fields.items() if name in UpscaleOptions.model_fields}
    if not given:
        return params
    try:
        return UpscaleOptions.model_validate(params.model_dump(exclude_unset=True) | given)
    except ValidationError as exc:
        errors = [dict(err, loc=("form", *err["loc"])) for err in exc.errors(include_url=False)]
        raise InvalidOptions.from_errors(errors) from None


async def run_upscale(
    engine: InferenceEngine,
    settings: Settings,
    data: bytes,
    params: UpscaleOptions,
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
    result = await engine.upscale(decoded.image, params, priority=priority, deadline=deadline, progress=progress)
    fmt = params.format or decoded.default_output
    body = await asyncio.to_thread(encode_image, result.image, fmt, params.quality)
    return Upscaled(body, ResultMeta(
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
    ))
