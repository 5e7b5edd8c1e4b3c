"""The web page at ``/``: try the model in a browser, no install and no build step.

The page is three static files shipped as package data (``service/web/``) and talks to the same
public API as any client (``/v1/upscale``, ``/v1/jobs``). It needs two facts before its first
request, which ``GET /ui-config`` gives: whether to ask for an API key, and whether images too
large for a synchronous request can go to the job queue. That endpoint is outside ``/v1`` and
open like ``/readyz``: the page must read it before it has a key. It tells no more than a
client learns from its first 401 or 503 ``jobs_disabled``.

Everything is served from this origin (no CDN, works offline), and the page's
Content-Security-Policy allows nothing else: no inline script, no foreign origin.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from ..dependencies import SettingsDep
from ..errors import HttpFailure

router = APIRouter(tags=["web"])

_ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
_HEADERS = {
    # blob: for the result and the input preview, which the page makes from fetched bytes.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidate: an upgraded server serves its own page at once
}


class AssetNotFound(HttpFailure):
    status, code = 404, "not_found"


class UIConfig(BaseModel):
    """What the web page (or any client) needs to know before its first request."""

    auth_required: bool = Field(description="`/v1/*` needs `Authorization: Bearer <key>` (VPDSR_API_KEYS is set)")
    jobs: bool = Field(
        description="`POST /v1/jobs` is configured (VPDSR_REDIS_URL): an image that gets 413 `too_large_for_sync` "
        "from `/v1/upscale` can be submitted there"
    )


@cache
def _asset(name: str) -> bytes:
    return (files("service") / "web" / name).read_bytes()


def _serve(name: str) -> Response:
    return Response(_asset(name), media_type=_ASSETS[name], headers=_HEADERS)


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return _serve("index.html")


@router.get("/web/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in _ASSETS:
        raise AssetNotFound(f"no such file: /web/{name}")
    return _serve(name)


@router.get("/ui-config", summary="What the web page needs to know: API keys required? job queue available?")
async def ui_config(settings: SettingsDep) -> UIConfig:
    return UIConfig(auth_required=bool(settings.api_keys), jobs=settings.jobs_enabled)
