"""Request options and JSON bodies of the HTTP API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class UpscaleParams(BaseModel):
    """Options of ``POST /v1/upscale``: query parameters, or fields of the multipart form."""

    model: str | None = Field(
        None,
        max_length=200,
        description="registry reference (name, name:version, name@alias). Only the loaded model is "
        "served: another existing model → 409, an unknown one → 404. Default: the loaded model.",
    )
    scale: int | None = Field(
        None, ge=2, le=4, description="output scale; 4 is the model's own, 2 and 3 resize its result with Lanczos"
    )
    format: Literal["png", "jpeg", "webp"] | None = Field(
        None, description="output format; default jpeg for a JPEG input, png otherwise"
    )
    quality: int | None = Field(None, ge=1, le=100, description="jpeg/webp quality (default 90; ignored for png)")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="noise seed, for reproducible results; default random (see X-Seed)"
    )
    steps: int | None = Field(
        None, ge=1, le=1000, description="sampler steps, 1..the model's maximum; default the model's own"
    )
    tile: int | None = Field(
        None, ge=1, le=4096, description="tile size in input pixels, one of the model's tile sizes (GET /v1/models)"
    )


class UpscaleJSON(BaseModel):
    """The answer of ``POST /v1/upscale`` with ``Accept: application/json``."""

    model: str
    version: str
    width: int
    height: int
    format: Literal["png", "jpeg", "webp"]
    seed: int
    steps: int
    queue_ms: float
    compute_ms: float
    image_base64: str = Field(description="the encoded output image, base64")


class LoadedModel(BaseModel):
    state: Literal["loading", "ready", "failed", "stopped"]
    ref: str = Field(description="the configured reference, e.g. vpdsr-small@production")
    name: str | None = None
    version: str | None = None
    device: str | None = None
    dtype: str | None = None
    scale: int | None = None
    default_steps: int | None = None
    max_steps: int | None = None
    tile_sizes: list[int] = Field(default_factory=list)
    batch_sizes: list[int] = Field(default_factory=list, description="warmed batch sizes")
    error: str | None = None


class ModelsResponse(BaseModel):
    loaded: LoadedModel
    models: list[dict[str, Any]] = Field(description="registry contents (Registry.list())")


class CheckResult(BaseModel):
    ok: bool
    state: str


class ReadyResponse(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, CheckResult]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
