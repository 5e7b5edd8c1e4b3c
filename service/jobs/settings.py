"""Job-queue configuration: the service's :class:`~service.settings.Settings` job fields plus a few
tuning knobs of the consumer that only this package reads (same ``VPDSR_`` prefix)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.errors import VPDSRError


class JobSettings(BaseSettings):
    """Consumer tuning; environment variable = ``VPDSR_`` + upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="VPDSR_", extra="ignore")

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


class JobConfigError(VPDSRError, ValueError):
    """Settings that cannot work together (reported at start-up, never at the first job)."""


@dataclass(frozen=True)
class JobConfig:
    redis_url: str | None
    consume: bool = True
    ttl_s: float = 86400
    visibility_timeout_s: float = 600
    max_attempts: int = 3
    stream_maxlen: int = 10000
    concurrency: int = 4
    shutdown_grace_s: float = 45
    reclaim_interval_s: float | None = None
    stats_interval_s: float = 5
    block_ms: int = 1000
    test_delay_s: float = 0

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)

    @classmethod
    def from_settings(cls, settings: Any, extra: JobSettings | None = None, **overrides: Any) -> "JobConfig":
        """``settings``: the service's Settings (its ``redis_url``, ``consume_jobs``, ``job_*`` fields)."""
        extra = extra or JobSettings()
        values = dict(
            redis_url=settings.redis_url or None,
            consume=settings.consume_jobs,
            ttl_s=settings.job_ttl_s,
            visibility_timeout_s=settings.job_visibility_timeout_s,
            max_attempts=settings.job_max_attempts,
            stream_maxlen=settings.job_stream_maxlen,
            concurrency=extra.job_concurrency,
            shutdown_grace_s=extra.job_shutdown_grace_s,
            reclaim_interval_s=extra.job_reclaim_interval_s,
            stats_interval_s=extra.job_stats_interval_s,
            block_ms=extra.job_block_ms,
            test_delay_s=extra.job_test_delay_s,
        )
        values.update(overrides)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.enabled:
            return
        # No bound on how long one attempt may run: a running job's entry is kept fresh by its
        # consumer's heartbeat, so the visibility timeout only says how soon a dead worker's job
        # is taken over.
        if self.ttl_s <= self.visibility_timeout_s:
            raise JobConfigError(
                f"VPDSR_JOB_TTL_S ({self.ttl_s:g} s) must exceed VPDSR_JOB_VISIBILITY_TIMEOUT_S "
                f"({self.visibility_timeout_s:g} s): a job's input must outlive a reclaim"
            )
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):  # type: ignore[union-attr]
            raise JobConfigError(f"VPDSR_REDIS_URL must be a redis://, rediss:// or unix:// URL, got {self.redis_url!r}")
