"""Every knob of the HTTP service and the job worker, read from ``VPDSR_*`` environment variables.

One typed object instead of scattered ``os.environ`` look-ups, so a typo in a deployment fails at
start-up with a clear validation error rather than at the first request. ``docs/service.md``
documents each field; the CLI (`vpdsr serve`) overrides the ones given as flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MB = 1024 * 1024


class Settings(BaseSettings):
    """Service configuration; environment variable = ``VPDSR_`` + upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="VPDSR_", extra="ignore")

    # -- model ------------------------------------------------------------------------------------
    registry: Path = Field(Path("registry"), description="model registry folder")
    model: str = Field("vpdsr-small@production", description="registry reference of the model to serve")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = CUDA when present")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    # -- HTTP -------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer tokens; empty = no authentication"
    )

    # -- dynamic batching and admission -----------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=256, description="tiles per model call")
    max_delay_ms: float = Field(10, ge=0, description="longest a tile waits for its batch to fill")
    max_queue: int = Field(256, ge=1, description="tiles waiting before new requests get 429")
    request_timeout_s: float = Field(60, gt=0, description="queue + compute limit of a synchronous request")

    # -- input limits -----------------------------------------------------------------------------
    max_body_bytes: int = Field(25 * MB, ge=1)
    max_pixels: int = Field(4096 * 4096, ge=1, description="width × height of the low-resolution input")

    # -- Redis job queue (service/jobs) -----------------------------------------------------------
    redis_url: str | None = None
    consume_jobs: bool = True
    job_ttl_s: int = Field(86400, ge=1)
    job_visibility_timeout_s: int = Field(600, ge=1)
    job_max_attempts: int = Field(3, ge=1)
    job_stream_maxlen: int = Field(10000, ge=1)
    metrics_port: int = Field(9100, ge=0, le=65535)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """``VPDSR_API_KEYS=key1,key2``: a plain comma-separated list, blanks dropped."""
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value
