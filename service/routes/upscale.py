"""``POST /v1/upscale``: an image in, the super-resolved image (or JSON around it) out."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..auth import require_api_key
from ..batcher import Priority
from ..engine import Engine, UpscaleOptions
from ..errors import ClientClosedRequest, error_responses
from ..imageio import ImageLimits, MEDIA_TYPES, OutputFormat, decode_image, encode_image, read_upload
from ..schemas import UpscaleJSON, UpscaleParams
from ..settings import Settings

router = APIRouter(prefix="/v1", tags=["upscale"], dependencies=[Depends(require_api_key)])

T = TypeVar("T")

_BINARY = {"schema": {"type": "string", "format": "binary"}}


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


_INPUT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff", "application/octet-stream")
_REQUEST_BODY = {
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
        **{media_type: _BINARY for media_type in _INPUT_TYPES},
    },
}
_RESULT_HEADERS = {
    "X-Model": "name of the model that ran",
    "X-Model-Version": "its registry version",
    "X-Seed": "the noise seed used (send it back as `seed` to reproduce the result)",
    "X-Steps": "sampler steps run",
    "X-Queue-Time-Ms": "from admission until the first tile started computing",
    "X-Compute-Time-Ms": "from the first tile starting until the image was assembled",
    "X-Frames-Ignored": "frames after the first of an animated / multi-page input (0 otherwise)",
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": UpscaleJSON,
        "description": "the upscaled image (png, jpeg or webp); JSON with `Accept: application/json`",
        "content": {media_type: _BINARY for media_type in MEDIA_TYPES.values()},
        "headers": {name: {"description": text, "schema": {"type": "string"}} for name, text in _RESULT_HEADERS.items()},
    },
    **error_responses(400, 401, 404, 408, 409, 413, 415, 422, 429, 503, 504),
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
    return UpscaleOptions(steps=params.steps, seed=params.seed, tile=params.tile, scale=params.scale)


def check_options(engine: Engine, params: UpscaleParams) -> None:
    """Validate options against the loaded model without running it (409/404/422 as an upscale)."""
    engine.check_model(params.model)
    engine.resolve_options(to_options(params))


async def run_upscale(
    engine: Engine,
    settings: Settings,
    data: bytes,
    params: UpscaleParams,
    *,
    priority: Priority = Priority.INTERACTIVE,
    deadline: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Upscaled:
    """Image bytes + options → encoded result: the one path of synchronous requests and jobs.
    ``deadline`` (``time.monotonic()``) defaults to ``request_timeout_s`` from now for interactive
    requests; background work (jobs) has none: its wait for capacity is not a failure.
    ``progress(tiles done, tiles in total)`` goes to :meth:`Engine.upscale` (jobs report it)."""
    engine.check_model(params.model)
    decoded = await run_in_threadpool(decode_image, data, ImageLimits.of(settings))
    if deadline is None and priority is Priority.INTERACTIVE:
        deadline = time.monotonic() + settings.request_timeout_s
    result = await engine.upscale(decoded.image, to_options(params), priority=priority, deadline=deadline,
                                  progress=progress)
    fmt = params.format or decoded.default_output
    body = await run_in_threadpool(encode_image, result.image, fmt, params.quality)
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


@router.post(
    "/upscale",
    summary="Upscale an image ×4 (or ×2, ×3)",
    response_class=Response,
    responses=_RESPONSES,
    openapi_extra={"requestBody": _REQUEST_BODY},
)
async def upscale(request: Request, params: Annotated[UpscaleParams, Query()]) -> Response:
    settings: Settings = request.app.state.settings
    engine: Engine = request.app.state.engine
    engine.ready_pipeline()  # refuse before reading a body we could not process
    upload = await read_upload(request, settings.max_body_bytes)
    options = merge_form_fields(params, upload.fields)
    done = await _unless_disconnected(request, run_upscale(engine, settings, upload.data, options))
    if wants_json(request.headers.get("accept", "")):
        return JSONResponse(done.json().model_dump(), headers=done.headers)
    return Response(done.body, media_type=done.media_type, headers=done.headers)


def merge_form_fields(params: UpscaleParams, fields: dict[str, str]) -> UpscaleParams:
    """Options from multipart form fields, over those from the query string."""
    given = {name: value for name, value in fields.items() if name in UpscaleParams.model_fields}
    if not given:
        return params
    try:
        return UpscaleParams.model_validate(params.model_dump(exclude_unset=True) | given)
    except ValidationError as exc:
        errors = [dict(err, loc=("form", *err["loc"])) for err in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def wants_json(accept: str) -> bool:
    """True if ``application/json`` is preferred over images (highest q; ties: first listed)."""
    best_json, best_image = (0.0, 0), (0.0, 0)
    for position, part in enumerate(accept.split(",")):
        media_type, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        rank = (q, -position)
        if media_type.lower() == "application/json":
            best_json = max(best_json, rank)
        elif media_type.lower().startswith("image/") or media_type == "*/*":
            best_image = max(best_image, rank)
    return best_json[0] > 0 and best_json > best_image


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away (its queued tiles are then dropped)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        gone.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task.cancelled():
        raise ClientClosedRequest("client disconnected before the result was ready")
    return task.result()


async def _client_gone(request: Request) -> None:
    """Returns when the ASGI server reports that the client disconnected (the body is read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
