"""``POST /v1/upscale``: an image in, the super-resolved image (or JSON around it) out.

The HTTP side only (reading the upload, content negotiation, a client that goes away): the
upscale itself is :func:`service.upscale.run_upscale`, which jobs run too.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from ..dependencies import EngineDep, SettingsDep, require_api_key
from ..errors import error_responses
from ..imageio import MEDIA_TYPES, read_upload
from ..schemas import UpscaleJSON, UpscaleOptions
from ..upscale import BINARY, REQUEST_BODY, merge_form_fields, run_upscale
from .disconnect import unless_disconnected

router = APIRouter(prefix="/v1", tags=["upscale"], dependencies=[Depends(require_api_key)])

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
        "content": {media_type: BINARY for media_type in MEDIA_TYPES.values()},
        "headers": {name: {"description": text, "schema": {"type": "string"}} for name, text in _RESULT_HEADERS.items()},
    },
    **error_responses(400, 401, 404, 408, 409, 413, 415, 422, 429, 503, 504),
}


@router.post(
    "/upscale",
    summary="Upscale an image ×4 (or ×2, ×3)",
    response_class=Response,
    responses=_RESPONSES,
    openapi_extra={"requestBody": REQUEST_BODY},
)
async def upscale(
    request: Request, params: Annotated[UpscaleOptions, Query()], settings: SettingsDep, engine: EngineDep
) -> Response:
    engine.ready_pipeline()  # refuse before reading a body we could not process
    upload = await read_upload(request, settings.max_body_bytes)
    options = merge_form_fields(params, upload.fields)
    deadline = time.monotonic() + settings.request_timeout_s
    done = await unless_disconnected(request, run_upscale(engine, settings, upload.data, options, deadline=deadline))
    if wants_json(request.headers.get("accept", "")):
        return JSONResponse(done.json().model_dump(), headers=done.meta.headers)
    return Response(done.body, media_type=done.meta.media_type, headers=done.meta.headers)


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
