"""The Redis side of async jobs: the job record and :class:`JobQueue`, the client that moves jobs
through their states.

Key names live in :mod:`jobqueue.keys`, the Lua scripts (one per transition, so each is atomic
and re-running it is harmless) in :mod:`jobqueue.scripts`, with the state machine.

succeeded, failed and cancelled are final: a late or duplicate worker never changes them. A
stream entry is acknowledged (XACK) in the same script that stores the result or the final
state, never before, so a worker that dies at any point leaves its entry pending, and
XAUTOCLAIM hands it to another worker after the visibility timeout. A live worker keeps its
entry fresh (``touch``), so only a dead worker's jobs are taken over, however long a job runs.

The job hash's ``stream_id`` names the one live delivery of a job: start, fail, touch and
requeue act only for that entry, so a superseded entry (a retried ``fail`` whose first reply was
lost, a re-queued trimmed entry) can never run the job a second time. Progress reports (tiles
done) are guarded the same way as the heartbeat: only the consumer running the job's current
entry writes them.

Timestamps come from the Redis server's clock (TIME), so workers' clocks do not matter.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from . import scripts
from .keys import (
    DEAD_STREAM,
    GROUP,
    INFLIGHT,
    JOB_PREFIX,
    STREAM,
    JobState,
    idempotency_key,
    input_key,
    job_key,
    result_key,
    valid_job_id,
)


def _s(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _f(value: Any) -> float | None:
    text = _s(value)
    return float(text) if text else None


@dataclass(frozen=True)
class JobRecord:
    """A job as stored in ``vpdsr:job:<id>``."""

    id: str
    state: JobState
    created_at: float | None
    started_at: float | None
    finished_at: float | None
    attempts: int
    error_code: str | None
    error_message: str | None
    options: dict[str, Any]
    fingerprint: str | None
    result_content_type: str | None
    result_size: int | None
    result_meta: dict[str, Any]
    dead_lettered: bool
    owner: str  # SHA-256 of the API key that submitted it; "" without API keys
    wait_s: float | None  # succeeded: submission -> start of the computation that made the result
    compute_s: float | None  # succeeded: that computation
    progress: tuple[int, int] | None  # (tiles done, tiles in total) of the latest attempt, once reported

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> "JobRecord":
        h = {_s(k): _s(v) for k, v in raw.items()}
        return cls(
            id=h["id"] or "",
            state=JobState(h.get("state") or JobState.QUEUED),
            created_at=_f(h.get("created_at")),
            started_at=_f(h.get("started_at")),
            finished_at=_f(h.get("finished_at")),
            attempts=int(h.get("attempts") or 0),
            error_code=h.get("error_code"),
            error_message=h.get("error_message"),
            options=json.loads(h.get("options") or "{}"),
            fingerprint=h.get("fingerprint"),
            result_content_type=h.get("result_content_type"),
            result_size=int(h["result_size"]) if h.get("result_size") else None,
            result_meta=json.loads(h.get("result_meta") or "{}"),
            dead_lettered=h.get("dead_lettered") == "1",
            owner=h.get("owner") or "",
            wait_s=_f(h.get("wait_s")),
            compute_s=_f(h.get("compute_s")),
            progress=(int(h.get("progress_done") or 0), int(h["progress_total"]))
            if h.get("progress_total") else None,
        )

    @classmethod
    def from_pairs(cls, pairs: Sequence[Any]) -> "JobRecord":
        """From a script's HGETALL reply: a flat field, value, ... list."""
        return cls.from_hash(dict(zip(pairs[::2], pairs[1::2])))


class Hold(StrEnum):
    """Whether a consumer still holds the job it runs, as its heartbeat and progress writes learn."""

    KEPT = "kept"
    LOST = "lost"  # taken over by another consumer, final, expired, or its entry trimmed
    CANCELLED = "cancelled"  # cancelled by its client: stop computing it


_HOLDS = {1: Hold.KEPT, 0: Hold.LOST, -1: Hold.CANCELLED}


@dataclass(frozen=True)
class Submitted:
    job: JobRecord
    created: bool  # False: an existing job returned for the same Idempotency-Key


class BacklogFull(Exception):
    """The stream's undelivered backlog reached ``job_stream_maxlen``: more would be trimmed away."""

    def __init__(self, lag: int) -> None:
        super().__init__(f"the job queue is full ({lag} jobs waiting)")
        self.lag = lag


@dataclass(frozen=True)
class Delivery:
    """A stream entry handed to this consumer (new, or reclaimed from a dead one)."""

    stream_id: str
    job_id: str
    reclaimed: bool = False


@dataclass(frozen=True)
class Started:
    """The outcome of :meth:`JobQueue.start`: ``run`` (with the input) or something to record."""

    outcome: str  # run | skip | dead_lettered | failed
    attempt: int = 0
    data: bytes = b""
    options: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = None
    created_at: float | None = None
    detail: str | None = None  # skip: the state / 'missing'; failures: the code
    message: str | None = None


@dataclass(frozen=True)
class Finished:
    outcome: str  # succeeded | failed | dead_lettered | retry | duplicate | missing | stale | not_owner
    duration_s: float | None = None  # queued -> done, when this call finished the job
    code: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class QueueStats:
    length: int  # entries not yet delivered to the group (lag); XLEN when Redis cannot tell
    pending: int  # delivered, not acknowledged (XPENDING count)
    dead: int  # entries in the dead-letter stream


def fingerprint(data: bytes, content_type: str | None, options: dict[str, Any]) -> str:
    """What makes two submissions 'the same request' for an Idempotency-Key."""
    h = hashlib.sha256(data)
    h.update(b"\0" + (content_type or "").encode() + b"\0")
    h.update(json.dumps(options, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


class JobQueue:
    """Job transitions on one Redis (standalone or behind Sentinel; not Redis Cluster: the scripts
    touch several keys in different hash slots)."""

    def __init__(
        self,
        redis: Redis,
        *,
        ttl_s: float,
        visibility_timeout_s: float,
        max_attempts: int,
        stream_maxlen: int,
        dead_maxlen: int | None = None,
    ) -> None:
        self.redis = redis
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.visibility_timeout_s = visibility_timeout_s
        self.max_attempts = max_attempts
        self.stream_maxlen = stream_maxlen
        self.dead_maxlen = dead_maxlen or stream_maxlen
        self._submit = redis.register_script(scripts.SUBMIT)
        self._start = redis.register_script(scripts.START)
        self._complete = redis.register_script(scripts.COMPLETE)
        self._fail = redis.register_script(scripts.FAIL)
        self._requeue = redis.register_script(scripts.REQUEUE)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._touch = redis.register_script(scripts.TOUCH)
        self._progress = redis.register_script(scripts.PROGRESS)
        self._forget = redis.register_script(scripts.FORGET)
        self._cursor = "0-0"

    # -- producer / API side ---------------------------------------------------------------------
    async def ensure_group(self) -> None:
        """Create the consumer group (from the stream's start, so nothing queued is skipped)."""
        try:
            await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(
        self,
        data: bytes,
        content_type: str | None,
        options: dict[str, Any],
        *,
        idempotency: str | None = None,
        owner: str = "",
    ) -> Submitted:
        """Queue a job for ``owner``; with an ``idempotency`` key already used by the same owner,
        return that job instead (its record comes from the same script: it cannot vanish between)."""
        job_id = uuid.uuid4().hex
        fp = fingerprint(data, content_type, options)
        idem = idempotency_key(idempotency, owner) if idempotency else ""
        code, value = await self._submit(
            keys=[job_key(job_id), input_key(job_id), STREAM, INFLIGHT, idem],
            args=[job_id, self.ttl_ms, self.stream_maxlen, GROUP, data, content_type or "",
                  json.dumps(options, sort_keys=True), fp, owner, JOB_PREFIX],
        )
        if int(code) == -1:
            raise BacklogFull(int(value))
        return Submitted(JobRecord.from_pairs(value), created=int(code) == 1)

    async def get(self, job_id: str) -> JobRecord | None:
        if not valid_job_id(job_id):
            return None
        raw = await self.redis.hgetall(job_key(job_id))
        return JobRecord.from_hash(raw) if raw else None

    async def result(self, job_id: str) -> bytes | None:
        if not valid_job_id(job_id):
            return None
        return await self.redis.get(result_key(job_id))

    async def cancel(self, job_id: str, owner: str = "") -> tuple[str, str | None]:
        """('cancelled' | 'already' | 'conflict' | 'missing', state for conflicts); another owner's
        job is 'missing'."""
        if not valid_job_id(job_id):
            return "missing", None
        reply = await self._cancel(keys=[job_key(job_id), input_key(job_id)], args=[owner])
        return _s(reply[0]) or "missing", _s(reply[1]) if len(reply) > 1 else None

    async def stats(self) -> QueueStats:
        pending = lag = 0
        known = False
        try:
            groups = await self.redis.xinfo_groups(STREAM)
        except ResponseError:  # no stream yet
            groups = []
        for g in groups:
            if _s(g.get("name")) == GROUP:
                pending = int(g.get("pending") or 0)
                if g.get("lag") is not None:
                    lag, known = int(g["lag"]), True
        if not known:
            lag = int(await self.redis.xlen(STREAM)) if groups else 0
        dead = int(await self.redis.xlen(DEAD_STREAM))
        return QueueStats(length=lag, pending=pending, dead=dead)

    # -- consumer side ---------------------------------------------------------------------------
    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """New entries for this consumer (XREADGROUP >), waiting up to ``block_ms``."""
        try:
            reply = await self.redis.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()  # Redis restarted empty, or the stream was deleted
            return []
        return [d for _, entries in reply or [] for d in self._deliveries(entries, reclaimed=False)]

    async def reclaim(self, consumer: str, count: int) -> tuple[list[Delivery], int]:
        """Entries pending longer than the visibility timeout (their consumer died): take them over.

        Returns the deliveries to run and how many lost entries were queued again: a pending entry
        whose stream data was trimmed (MAXLEN) comes back from XAUTOCLAIM as a deleted id; its job
        is found through ``vpdsr:jobs:inflight`` and gets a new stream entry."""
        min_idle = int(self.visibility_timeout_s * 1000)
        try:
            reply = await self.redis.xautoclaim(STREAM, GROUP, consumer, min_idle, self._cursor, count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return [], 0
        # XAUTOCLAIM scans at most 10 x count PEL entries per call: go on from its cursor next time.
        self._cursor = _s(reply[0]) or "0-0"
        deliveries = self._deliveries(reply[1], reclaimed=True)
        requeued = 0
        for sid in reply[2] if len(reply) > 2 else []:
            sid = _s(sid) or ""
            job_id = _s(await self.redis.hget(INFLIGHT, sid))
            if job_id is None:
                continue
            outcome = await self._requeue(
                keys=[job_key(job_id), STREAM, INFLIGHT],
                args=[sid, GROUP, "", "0", self.stream_maxlen, job_id],
            )
            requeued += _s(outcome[0]) == "requeued"
            await self.redis.hdel(INFLIGHT, sid)  # XAUTOCLAIM already dropped it from the PEL
        return deliveries, requeued

    @staticmethod
    def _deliveries(entries: Sequence[Any], *, reclaimed: bool) -> list[Delivery]:
        out = []
        for sid, fields in entries or []:
            if fields is None:
                continue
            job_id = _s(fields.get(b"id") or fields.get("id"))
            out.append(Delivery(_s(sid) or "", job_id or "", reclaimed))
        return out

    async def start(self, delivery: Delivery, consumer: str) -> Started:
        job_id = delivery.job_id if valid_job_id(delivery.job_id) else "0" * 32
        reply = await self._start(
            keys=[job_key(job_id), input_key(job_id), STREAM, INFLIGHT, DEAD_STREAM],
            args=[delivery.stream_id, GROUP, consumer, self.max_attempts, self.ttl_ms, self.dead_maxlen,
                  job_id, f"{self.visibility_timeout_s:g}"],
        )
        outcome = _s(reply[0]) or ""
        if outcome == "run":
            return Started(
                "run",
                attempt=int(reply[1]),
                data=bytes(reply[2]),
                options=json.loads(_s(reply[3]) or "{}"),
                content_type=_s(reply[4]) or None,
                created_at=_f(reply[5]),
            )
        if outcome == "skip":
            return Started("skip", detail=_s(reply[1]))
        return Started(outcome, detail=_s(reply[1]), message=_s(reply[2]))

    async def complete(
        self,
        delivery: Delivery,
        data: bytes,
        content_type: str,
        meta: dict[str, Any] | None = None,
        *,
        waited_s: float = 0.0,
        compute_s: float | None = None,
    ) -> Finished:
        """Store the result. The record's ``wait_s`` is the queueing before the attempt plus
        ``waited_s`` (its wait for capacity); ``compute_s`` defaults to the rest of the attempt."""
        job_id = delivery.job_id
        reply = await self._complete(
            keys=[job_key(job_id), input_key(job_id), result_key(job_id), STREAM, INFLIGHT],
            args=[delivery.stream_id, GROUP, self.ttl_ms, data, content_type, json.dumps(meta or {}),
                  f"{waited_s:.6f}", "" if compute_s is None else f"{compute_s:.6f}"],
        )
        outcome = _s(reply[0]) or ""
        if outcome == "succeeded":
            created, finished = _f(reply[1]), _f(reply[2])
            duration = finished - created if created is not None and finished is not None else None
            return Finished("succeeded", duration_s=duration)
        return Finished(outcome, code=_s(reply[1]) if len(reply) > 1 else None)

    async def fail(
        self, delivery: Delivery, consumer: str, code: str, message: str, *, retryable: bool
    ) -> Finished:
        """Record a failed attempt of ``consumer``'s delivery. Safe to retry: once the job has been
        queued again (or another consumer took it over), the delivery is no longer the job's
        current one and nothing happens (``stale`` / ``not_owner``)."""
        job_id = delivery.job_id
        reply = await self._fail(
            keys=[job_key(job_id), input_key(job_id), STREAM, INFLIGHT, DEAD_STREAM],
            args=[delivery.stream_id, GROUP, self.ttl_ms, code, message, "1" if retryable else "0",
                  self.max_attempts, self.stream_maxlen, self.dead_maxlen, job_id, consumer],
        )
        outcome = _s(reply[0]) or ""
        if outcome == "dead_lettered":
            return Finished(outcome, code=_s(reply[1]), message=_s(reply[2]))
        if outcome == "failed":
            return Finished(outcome, code=code, message=message)
        return Finished(outcome)

    async def release(self, delivery: Delivery, consumer: str) -> str:
        """Give a job in hand back to the queue now (shutdown): no wait for the visibility timeout,
        and the interrupted attempt does not count."""
        reply = await self._requeue(
            keys=[job_key(delivery.job_id), STREAM, INFLIGHT],
            args=[delivery.stream_id, GROUP, consumer, "1", self.stream_maxlen, delivery.job_id],
        )
        return _s(reply[0]) or ""

    async def touch(self, delivery: Delivery, consumer: str) -> Hold:
        """Reset the idle time of the entry of a job ``consumer`` is running (the heartbeat); LOST
        when it is not this consumer's running job any more, or its entry was trimmed; CANCELLED
        when its client cancelled it."""
        reply = await self._touch(keys=[job_key(delivery.job_id), STREAM],
                                  args=[delivery.stream_id, GROUP, consumer])
        return _HOLDS[int(reply)]

    async def progress(self, delivery: Delivery, consumer: str, done: int, total: int) -> Hold:
        """Record that ``done`` of ``total`` tiles of the job ``consumer`` runs are computed (KEPT);
        nothing is written when it is not this consumer's running job any more (LOST) or was
        cancelled (CANCELLED)."""
        reply = await self._progress(keys=[job_key(delivery.job_id)],
                                     args=[delivery.stream_id, consumer, done, total])
        return _HOLDS[int(reply)]

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        entries = await self.redis.xrange(DEAD_STREAM, count=count)
        return [{_s(k) or "": _s(v) or "" for k, v in fields.items()} | {"entry": _s(sid) or ""}
                for sid, fields in entries]

    async def forget_consumer(self, consumer: str) -> int:
        """Leave the group (on shutdown) if nothing is pending for this consumer."""
        return int(await self._forget(keys=[STREAM], args=[GROUP, consumer, 0]))

    async def prune_consumers(self, min_idle_s: float) -> int:
        """Delete consumers idle for ``min_idle_s`` with nothing pending (workers long gone)."""
        return int(await self._forget(keys=[STREAM], args=[GROUP, "", int(min_idle_s * 1000)]))
