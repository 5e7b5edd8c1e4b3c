"""Request options and JSON bodies of the HTTP API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.images import OutputFormat
from model.seeds import SEED_LIMIT


class UpscaleOptions(BaseModel):
    """The one request type of an upscale: the query parameters or multipart form fields of
    ``POST /v1/upscale`` and ``POST /v1/jobs``, what a job record stores (``model_dump``) and its
    worker reads back, and what :meth:`InferenceEngine.upscale` takes.

    Only types are checked here. The ranges of ``seed``, ``steps``, ``tile`` and ``scale`` are the
    model's own rules, checked once against the loaded model by ``InferenceEngine.resolve_options``
    (with :func:`model.seeds.check_seed`, :meth:`SRPipeline.check_steps` and
    :meth:`SRPipeline.check_tile`, the rules the CLI applies too): 422 ``invalid_parameter``.
    """

    model_config = ConfigDict(frozen=True)  # a default argument and a stored record: never changed

    model: str | None = Field(
        None,
        max_length=200,
        description="registry reference (name, name:version, name@alias). Only the loaded model is "
        "served: another existing model → 409, an unknown one → 404. Default: the loaded model.",
    )
    scale: int | None = Field(
        None, description="output scale, 2 to the model's own (4), the default; below it, the model's result is "
        "resized with Lanczos"
    )
    format: OutputFormat | None = Field(
        None, description="output format; default jpeg for a JPEG input, png otherwise"
    )
    quality: int | None = Field(None, ge=1, le=100, description="jpeg/webp quality (default 90; ignored for png)")
    seed: int | None = Field(
        None,
        description=f"noise seed, 0 to {SEED_LIMIT - 1} (2**53 - 1), for reproducible results; default: random "
        "per request. The seed used is in X-Seed (and a job's result.seed)",
    )
    steps: int | None = Field(
        None,
        description="sampler steps, 1 to the model's maximum (max_steps in GET /v1/models); default the model's own",
    )
    tile: int | None = Field(
        None, description="tile size in input pixels, one of the model's tile sizes (tile_sizes in GET /v1/models); "
        "default: chosen per image"
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
    autocast: bool | None = Field(None, description="half dtype as autocast over float32 weights (the CPU fast path)")
    channels_last: bool | None = None
    compile: str | None = Field(None, description="torch.compile mode; null = eager")
    threads: int | None = Field(None, description="intra-op CPU threads of the model")
    scale: int | None = None
    default_steps: int | None = None
    max_steps: int | None = None
    tile_sizes: list[int] = Field(default_factory=list)
    tile_seconds: dict[int, float] = Field(
        default_factory=dict, description="seconds per tile of each tile size at warm-up: images get the cheapest tiling"
    )
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
