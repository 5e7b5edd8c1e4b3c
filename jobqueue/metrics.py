"""Prometheus metrics of the job queue (names fixed: the Grafana dashboard and alerts use them).

Every process that touches the queue exports them: counters and the duration histogram count
what *this* process did (sum them over processes); the two gauges describe the shared stream and
are the same in every process (take ``max()`` over processes, as the dashboard does).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("succeeded", "failed", "cancelled", "dead_lettered")
# Queued -> done: a job can wait behind a backlog for minutes, so the buckets go well past 60 s.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class JobMetrics:
    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.jobs = Counter(
            "vpdsr_jobs_total", "Async jobs that reached a final state, by outcome", ["outcome"], registry=registry
        )
        for outcome in OUTCOMES:
            self.jobs.labels(outcome)
        self.duration = Histogram(
            "vpdsr_job_duration_seconds",
            "Time from submission to a stored result, for succeeded jobs",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_length = Gauge(
            "vpdsr_job_queue_length",
            "Jobs in the stream not yet delivered to a worker (consumer group lag)",
            registry=registry,
        )
        self.pending = Gauge(
            "vpdsr_job_pending", "Jobs delivered to a worker and not yet acknowledged (XPENDING)", registry=registry
        )
        self.reclaims = Counter(
            "vpdsr_job_reclaims_total",
            "Jobs taken over from a worker that did not finish them within the visibility timeout",
            registry=registry,
        )
        self.dead_letters = Counter(
            "vpdsr_job_dead_letters_total",
            "Jobs moved to the dead-letter stream vpdsr:jobs:dead after max_attempts",
            registry=registry,
        )


_default: JobMetrics | None = None


def job_metrics() -> JobMetrics:
    """The process-wide metrics on prometheus_client's default registry (created once)."""
    global _default
    if _default is None:
        _default = JobMetrics()
    return _default
