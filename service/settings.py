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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on the CPU"
    )

    # -- HTTP -------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer tokens; empty = no authentication"
    )

    # -- connections (uvicorn and service/body_timeout.py) ----------------------------------------
    max_connections: int = Field(
        64, ge=1, description="open connections beyond which new requests get 503 (uvicorn's limit_concurrency)"
    )
    keep_alive_timeout_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    body_idle_timeout_s: float = Field(20, gt=0, description="longest wait for the next chunk of a body (408)")
    body_timeout_s: float = Field(120, gt=0, description="longest a whole body may take from the request's start (408)")
    shutdown_timeout_s: int = Field(
        20, ge=0, description="on SIGTERM, how long open connections may take to finish before they are cut"
    )

    # -- dynamic batching and admission -----------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=256, description="tiles per model call")
    max_delay_ms: float = Field(10, ge=0, description="longest a tile waits for its batch to fill")
    max_queue: int = Field(256, ge=1, description="tiles waiting before new requests get 429")
    request_timeout_s: float = Field(60, gt=0, description="queue + compute limit of a synchronous request")

    # -- input limits -----------------------------------------------------------------------------
    max_body_bytes: int = Field(25 * MB, ge=1)
    max_pixels: int = Field(4096 * 4096, ge=1, description="width × height of the low-resolution input")
    max_side: int = Field(8192, ge=1, description="longest side of the input, in pixels")
    max_aspect: float = Field(32, ge=1, description="longest side / shortest side of the input")

    # -- Redis job queue (service/jobs) -----------------------------------------------------------
    redis_url: str | None = None
    consume_jobs: bool = True
    job_ttl_s: int = Field(86400, ge=1)
    job_visibility_timeout_s: int = Field(600, ge=1)
    job_max_attempts: int = Field(3, ge=1)
    job_stream_maxlen: int = Field(10000, ge=1)
    metrics_port: int = Field(9100, ge=0, le=65535)

    # -- fast path (service.engine.load_pipeline) -------------------------------------------------
    compile: Literal["off", "default", "max-autotune", "reduce-overhead"] = Field(
        "off",
        description="torch.compile mode of the model; reduce-overhead adds CUDA graphs. Compiles at warm-up, "
        "cached in TORCHINDUCTOR_CACHE_DIR",
    )
    channels_last: Literal["auto", "true", "false"] = Field(
        "auto", description="channels-last memory format; auto = on for CUDA"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """``VPDSR_API_KEYS=key1,key2``: a plain comma-separated list, blanks dropped."""
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value
