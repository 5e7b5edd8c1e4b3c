"""Every Redis name of the job queue, and the job states, in one place.

Layout (names fixed: the Kubernetes KEDA trigger and the dashboards use the first two)::

    vpdsr:jobs                 stream, one entry per delivery of a job: {id: <job id>}
                               consumer group vpdsr-workers; XADD MAXLEN ~ job_stream_maxlen
    vpdsr:jobs:dead            dead-letter stream: {id, code, message, attempts, stream_id}
    vpdsr:jobs:inflight        hash stream-entry-id -> job id for entries not yet acknowledged
                               (finds the job of a pending entry that MAXLEN trimming deleted)
    vpdsr:job:<id>             hash: state, created_at, started_at, finished_at, attempts, error_*,
                               options, input/result metadata, wait_s, compute_s, owner,
                               stream_id (current entry), consumer,
                               progress_done / progress_total (tiles, of the latest attempt)
    vpdsr:job:<id>:input       the uploaded image bytes, as received
    vpdsr:job:<id>:result      the encoded result image
    vpdsr:jobs:idempotency:<sha256(owner, key)>   job id for an owner's Idempotency-Key
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum

STREAM = "vpdsr:jobs"
GROUP = "vpdsr-workers"
DEAD_STREAM = "vpdsr:jobs:dead"
INFLIGHT = "vpdsr:jobs:inflight"
JOB_PREFIX = "vpdsr:job:"
IDEMPOTENCY_PREFIX = "vpdsr:jobs:idempotency:"

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


# A str: a state compares, formats and serialises as its value, which is what the job hash holds
# and the Lua scripts of jobqueue/scripts.py spell.
class JobState(StrEnum):
    """queued → running → succeeded | failed; queued → cancelled. A retried job goes back to
    queued. succeeded, failed and cancelled are final: nothing changes a job once it is in one."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def job_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}"


def input_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}:input"


def result_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}:result"


def idempotency_key(key: str, owner: str = "") -> str:
    """Client keys are hashed (any length or character set maps to a short, safe Redis key) within
    their owner's namespace, so two clients' keys never meet. Without an owner (no API keys) the
    hash is the key's alone, as before owners existed."""
    digest = hashlib.sha256(f"{owner}\0".encode() if owner else b"")
    digest.update(key.encode("utf-8", "surrogateescape"))
    return IDEMPOTENCY_PREFIX + digest.hexdigest()


def valid_job_id(job_id: str) -> bool:
    return bool(_JOB_ID.match(job_id))
