"""Every knob of the HTTP service and the job worker, read from ``VPDSR_*`` environment variables.

One typed object instead of scattered ``os.environ`` look-ups, so a typo in a deployment fails at
start-up with a clear validation error rather than at the first request. It is the one settings
source of the service: the API, the job queue and ``vpdsr worker`` all read this object, so a
new setting is written once, here. ``docs/service.md`` documents each field; the CLI (``vpdsr
serve``, ``vpdsr worker``) overrides the ones given as flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
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
        "auto",
        description="auto = bfloat16 on CUDA and on CPUs with bf16 matrix units (AMX, AVX-512 BF16; autocast), "
        "float32 on other CPUs",
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
        64, ge=1, description="open connections (beyond it the longest-idle one is closed for a newcomer) and "
        "requests in progress (beyond it 503 busy; probes exempt)"
    )
    header_timeout_s: float = Field(10, gt=0, description="a connection without a request's headers is closed after this")
    keep_alive_timeout_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    body_idle_timeout_s: float = Field(20, gt=0, description="longest wait for the next chunk of a body (408)")
    body_timeout_s: float = Field(120, gt=0, description="longest a whole body may take from the request's start (408)")
    shutdown_timeout_s: int = Field(
        20, ge=0, description="on SIGTERM, how long open connections may take to finish before they are cut"
    )

    # -- dynamic batching and admission -----------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=256, description="tiles per model call")
    max_delay_ms: float = Field(10, ge=0, description="longest a tile waits for its batch to fill")
    max_queue: int | None = Field(
        None, ge=1, description="interactive tiles that may wait (429 beyond it, 413 for a request of more); unset: "
        "no tile count, synchronous requests are bounded by their measured compute time (request_timeout_s)",
    )
    request_timeout_s: float = Field(
        60, gt=0, description="queue + compute limit of a synchronous request; a request whose compute, estimated "
        "from the speed measured on this server, exceeds it gets 413 at once",
    )

    # -- input limits -----------------------------------------------------------------------------
    max_body_bytes: int = Field(25 * MB, ge=1)
    max_pixels: int = Field(4096 * 4096, ge=1, description="width × height of the low-resolution input")
    max_side: int = Field(8192, ge=1, description="longest side of the input, in pixels")
    max_aspect: float = Field(32, ge=1, description="longest side / shortest side of the input")
    max_jpeg_scans: int = Field(
        100, ge=1, description="scans of a progressive JPEG (usual files have about 10; each costs a pass over "
        "every pixel)",
    )
    decode_timeout_s: float = Field(
        10, gt=0, description="wall-clock time one decode may take in its process: past it the process is killed (413)"
    )
    decode_processes: int = Field(2, ge=1, le=64, description="processes that decode uploads (service.decoding)")

    # -- Redis job queue (service/jobs, docs/jobs.md) ---------------------------------------------
    redis_url: str | None = Field(None, description="redis://, rediss:// or unix:// URL; unset: jobs disabled")
    consume_jobs: bool = Field(True, description="the API process also runs jobs (`vpdsr worker` always does)")
    job_ttl_s: int = Field(86400, ge=1, description="lifetime of job records, inputs and results")
    job_visibility_timeout_s: int = Field(
        30, ge=1, description="a dead worker's jobs are taken over after this (live ones' heartbeat every third of it)"
    )
    job_max_attempts: int = Field(3, ge=1, description="attempts before a job is dead-lettered")
    job_max_tiles: int = Field(4096, ge=1, description="most tiles one job's image may have (413 at submission)")
    job_stream_maxlen: int = Field(10000, ge=1, description="cap of the job stream, and the largest backlog accepted")
    metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus port of `vpdsr worker`")
    # consumer tuning
    job_concurrency: int = Field(4, ge=1, le=256, description="jobs one consumer runs at once (they share batches)")
    job_shutdown_grace_s: float = Field(
        45, ge=0, description="on SIGTERM, time for jobs in hand to finish before they are handed back"
    )
    job_reclaim_interval_s: float | None = Field(
        None, gt=0, description="how often to look for jobs of dead workers (default visibility/4, at most 30 s)"
    )
    job_stats_interval_s: float = Field(5, gt=0, description="refresh period of the queue gauges")
    job_block_ms: int = Field(1000, ge=10, le=30000, description="XREADGROUP BLOCK: shutdown reacts within this")
    job_test_delay_s: float = Field(0, ge=0, description="TESTS ONLY: sleep this long in every job")

    # -- fast path (service.engine.load_pipeline) -------------------------------------------------
    compile: Literal["off", "default", "max-autotune", "reduce-overhead"] = Field(
        "off",
        description="torch.compile mode of the model; reduce-overhead adds CUDA graphs. Compiles at warm-up, "
        "cached in TORCHINDUCTOR_CACHE_DIR",
    )
    channels_last: Literal["auto", "true", "false"] = Field(
        "auto", description="channels-last memory format; auto = on (the fast convolutions on CUDA and the CPU)"
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads of the model; unset = PyTorch's count (OMP_NUM_THREADS when set) "
        "capped at the cores this process may use (CPU affinity, cgroup quota)",
    )

    @property
    def jobs_enabled(self) -> bool:
        """Whether ``/v1/jobs`` and the consumers have a job queue (``VPDSR_REDIS_URL`` is set)."""
        return bool(self.redis_url)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """``VPDSR_API_KEYS=key1,key2``: a plain comma-separated list, blanks dropped."""
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _check_job_queue(self) -> Settings:
        """Job settings that cannot work together: reported at start-up, never at the first job."""
        if not self.jobs_enabled:
            return self
        # No bound on how long one attempt may run: a running job's entry is kept fresh by its
        # consumer's heartbeat, so the visibility timeout only says how soon a dead worker's job
        # is taken over.
        if self.job_ttl_s <= self.job_visibility_timeout_s:
            raise ValueError(
                f"VPDSR_JOB_TTL_S ({self.job_ttl_s:g} s) must exceed VPDSR_JOB_VISIBILITY_TIMEOUT_S "
                f"({self.job_visibility_timeout_s:g} s): a job's input must outlive a reclaim"
            )
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):  # type: ignore[union-attr]
            raise ValueError(f"VPDSR_REDIS_URL must be a redis://, rediss:// or unix:// URL, got {self.redis_url!r}")
        return self
