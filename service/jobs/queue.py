"""The Redis side of async jobs: keys, the job state machine and its atomic transitions.

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

State machine (every transition is one Lua script, so it is atomic and re-running it is
harmless)::

    queued --start--> running --complete--> succeeded
      |                  |----fail (permanent)----------------> failed
      |                  |----fail (retryable, attempts left)--> queued (new stream entry)
      |                  |----fail (retryable, no attempts left)--> failed + dead letter
      |                  '----release (graceful shutdown)-----> queued (new entry, attempt refunded)
      '--cancel--> cancelled
    queued|running --start with attempts >= max_attempts (reclaimed)--> failed + dead letter

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
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

STREAM = "vpdsr:jobs"
GROUP = "vpdsr-workers"
DEAD_STREAM = "vpdsr:jobs:dead"
INFLIGHT = "vpdsr:jobs:inflight"
JOB_PREFIX = "vpdsr:job:"
IDEMPOTENCY_PREFIX = "vpdsr:jobs:idempotency:"

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


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


# -- Lua -----------------------------------------------------------------------------------------
# Shared prelude: server time, ack of the entry in hand, enqueueing, dead letters, and whether a
# job is running on a consumer for a given entry.
_PRELUDE = """
local function now()
  local t = redis.call('TIME')
  return string.format('%d.%06d', t[1], t[2])
end
local function running_here(job, sid, consumer)
  local f = redis.call('HMGET', job, 'state', 'stream_id', 'consumer')
  return f[1] == 'running' and f[2] == sid and f[3] == consumer
end
local function ack(stream, inflight, group, sid)
  redis.call('XACK', stream, group, sid)
  redis.call('HDEL', inflight, sid)
end
local function enqueue(stream, inflight, maxlen, job_id)
  local sid = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'id', job_id)
  redis.call('HSET', inflight, sid, job_id)
  return sid
end
local function dead_letter(job, input, dead, dead_maxlen, job_id, code, message, attempts, sid, ttl)
  redis.call('HSET', job, 'state', 'failed', 'finished_at', now(), 'error_code', code,
             'error_message', message, 'dead_lettered', '1')
  redis.call('DEL', input)
  redis.call('PEXPIRE', job, ttl)
  redis.call('XADD', dead, 'MAXLEN', '~', dead_maxlen, '*', 'id', job_id, 'code', code,
             'message', message, 'attempts', attempts, 'stream_id', sid)
end
"""

# KEYS: job, input, stream, inflight, idempotency ("" = none)
# ARGV: job_id, ttl_ms, maxlen, group, input, input_content_type, options_json, fingerprint, owner,
#       job key prefix
# -> {1, job hash} created | {0, job hash} existing (idempotency) | {-1, lag} backlog full
_SUBMIT = _PRELUDE + """
if KEYS[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    -- A key whose job is gone (expired, evicted, deleted) is treated as absent: it is taken anew.
    local job = redis.call('HGETALL', ARGV[10] .. existing)
    if #job > 0 then return {0, job} end
  end
end
local maxlen = tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[3], ARGV[4], '0', 'MKSTREAM')
else
  -- Back-pressure: MAXLEN trimming keeps the newest >= maxlen entries, so entries not yet
  -- delivered (the group's lag) are never trimmed as long as the lag stays below maxlen.
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[3])
  if ok then
    for _, g in ipairs(groups) do
      local name, lag
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'lag' then lag = g[i + 1] end
      end
      if name == ARGV[4] and lag and tonumber(lag) >= maxlen then return {-1, lag} end
    end
  end
end
local sid = enqueue(KEYS[3], KEYS[4], maxlen, ARGV[1])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', 'queued', 'created_at', now(), 'attempts', '0',
           'options', ARGV[7], 'input_content_type', ARGV[6], 'input_size', string.len(ARGV[5]),
           'fingerprint', ARGV[8], 'owner', ARGV[9], 'stream_id', sid)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[2])
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[2]) end
return {1, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: job, input, stream, inflight, dead
# ARGV: stream_id, group, consumer, max_attempts, ttl_ms, dead_maxlen, job_id, visibility_s
# -> {'run', attempts, input, options, input_content_type, created_at}
#  | {'skip', state | 'missing' | 'superseded'} | {'dead_lettered', code, message} | {'failed', code, message}
_START = _PRELUDE + """
local sid = ARGV[1]
local f = redis.call('HMGET', KEYS[1], 'state', 'stream_id')
local state = f[1]
if not state then
  ack(KEYS[3], KEYS[4], ARGV[2], sid)
  return {'skip', 'missing'}
end
if state ~= 'queued' and state ~= 'running' then
  ack(KEYS[3], KEYS[4], ARGV[2], sid)
  return {'skip', state}
end
if f[2] ~= sid then
  -- Not the job's current entry: another one was queued meanwhile and is the one that runs.
  ack(KEYS[3], KEYS[4], ARGV[2], sid)
  return {'skip', 'superseded'}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if attempts >= tonumber(ARGV[4]) then
  local code = redis.call('HGET', KEYS[1], 'error_code')
  local message = redis.call('HGET', KEYS[1], 'error_message')
  if state == 'running' or not code then
    code = 'worker_lost'
    message = 'the worker running it stopped or stalled: not finished within the visibility timeout of '
              .. ARGV[8] .. ' s'
  end
  message = 'gave up after ' .. attempts .. ' attempt(s): ' .. message
  dead_letter(KEYS[1], KEYS[2], KEYS[5], ARGV[6], ARGV[7], code, message, attempts, sid, ARGV[5])
  ack(KEYS[3], KEYS[4], ARGV[2], sid)
  return {'dead_lettered', code, message}
end
local input = redis.call('GET', KEYS[2])
if not input then
  local message = 'the job input expired before the job could run'
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', now(), 'error_code', 'input_expired',
             'error_message', message)
  ack(KEYS[3], KEYS[4], ARGV[2], sid)
  return {'failed', 'input_expired', message}
end
attempts = attempts + 1
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', now(), 'attempts', attempts,
           'consumer', ARGV[3], 'stream_id', sid)
redis.call('HDEL', KEYS[1], 'progress_done', 'progress_total')  -- an earlier attempt's
-- A started job gets a full TTL to finish in, whatever its wait in the queue was.
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local f = redis.call('HMGET', KEYS[1], 'options', 'input_content_type', 'created_at')
return {'run', attempts, input, f[1], f[2], f[3]}
"""

# KEYS: job, input, result, stream, inflight
# ARGV: stream_id, group, ttl_ms, result, content_type, result_meta_json,
#       waited_s (within the attempt), compute_s ('' = the attempt's run time after its wait)
# -> {'succeeded', created_at, finished_at} | {'duplicate', state} | {'missing'}
_COMPLETE = _PRELUDE + """
local f = redis.call('HMGET', KEYS[1], 'state', 'created_at', 'started_at')
local state = f[1]
local out
if not state then
  out = {'missing'}
elseif state == 'queued' or state == 'running' then
  -- Result first, then the state: readers that see 'succeeded' always find the result.
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[3])
  local finished = now()
  local started = tonumber(f[3] or finished)
  local waited = tonumber(ARGV[7])
  local compute = tonumber(ARGV[8]) or math.max(0, tonumber(finished) - started - waited)
  redis.call('HSET', KEYS[1], 'state', 'succeeded', 'finished_at', finished, 'result_content_type', ARGV[5],
             'result_size', string.len(ARGV[4]), 'result_meta', ARGV[6],
             'wait_s', string.format('%.3f', started - tonumber(f[2]) + waited),
             'compute_s', string.format('%.3f', compute))
  redis.call('HDEL', KEYS[1], 'error_code', 'error_message')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('DEL', KEYS[2])
  out = {'succeeded', f[2], finished}
else
  out = {'duplicate', state}
end
ack(KEYS[4], KEYS[5], ARGV[2], ARGV[1])
return out
"""

# KEYS: job, input, stream, inflight, dead
# ARGV: stream_id, group, ttl_ms, code, message, retryable, max_attempts, maxlen, dead_maxlen, job_id,
#       consumer
# -> {'retry', new_sid} | {'failed'} | {'dead_lettered', code, message} | {'duplicate', state} | {'missing'}
#  | {'stale'} (this delivery was superseded: nothing to do) | {'not_owner'} (another consumer runs it)
_FAIL = _PRELUDE + """
local sid = ARGV[1]
local f = redis.call('HMGET', KEYS[1], 'state', 'stream_id', 'consumer')
local state = f[1]
local out
if not state then
  out = {'missing'}
elseif state ~= 'queued' and state ~= 'running' then
  out = {'duplicate', state}
elseif f[2] ~= sid then
  -- Already failed once for this delivery (a retried call whose first reply was lost) or
  -- superseded: queuing it again would run the job twice.
  out = {'stale'}
elseif state == 'running' and f[3] ~= ARGV[11] then
  -- Reclaimed by another consumer, which runs it now; its entry is not ours to ack.
  return {'not_owner'}
else
  local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
  if ARGV[6] == '1' and attempts < tonumber(ARGV[7]) then
    local new_sid = enqueue(KEYS[3], KEYS[4], ARGV[8], ARGV[10])
    redis.call('HSET', KEYS[1], 'state', 'queued', 'stream_id', new_sid, 'error_code', ARGV[4],
               'error_message', ARGV[5])
    out = {'retry', new_sid}
  elseif ARGV[6] == '1' then
    local message = 'gave up after ' .. attempts .. ' attempt(s): ' .. ARGV[5]
    dead_letter(KEYS[1], KEYS[2], KEYS[5], ARGV[9], ARGV[10], ARGV[4], message, attempts, sid, ARGV[3])
    out = {'dead_lettered', ARGV[4], message}
  else
    redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', now(), 'error_code', ARGV[4],
               'error_message', ARGV[5])
    redis.call('DEL', KEYS[2])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    out = {'failed'}
  end
end
ack(KEYS[3], KEYS[4], ARGV[2], sid)
return out
"""

# Put a job this consumer holds back in the queue at once (graceful shutdown, or a pending entry
# whose stream data was trimmed away), refunding the attempt when asked.
# KEYS: job, stream, inflight
# ARGV: stream_id, group, consumer ('' = any), refund ('1'/'0'), maxlen, job_id
# -> {'requeued', new_sid} | {'skip', reason}
_REQUEUE = _PRELUDE + """
local sid = ARGV[1]
local f = redis.call('HMGET', KEYS[1], 'state', 'consumer', 'attempts', 'stream_id')
local state = f[1]
if not state then
  ack(KEYS[2], KEYS[3], ARGV[2], sid)
  return {'skip', 'missing'}
end
if state ~= 'queued' and state ~= 'running' then
  ack(KEYS[2], KEYS[3], ARGV[2], sid)
  return {'skip', state}
end
if f[4] ~= sid or (ARGV[3] ~= '' and state == 'running' and f[2] ~= ARGV[3]) then
  -- Another worker reclaimed it meanwhile: it is theirs now; acking here would drop their entry.
  return {'skip', 'not_owner'}
end
local attempts = tonumber(f[3] or '0')
if ARGV[4] == '1' and state == 'running' and attempts > 0 then attempts = attempts - 1 end
local new_sid = enqueue(KEYS[2], KEYS[3], ARGV[5], ARGV[6])
redis.call('HSET', KEYS[1], 'state', 'queued', 'stream_id', new_sid, 'attempts', attempts)
ack(KEYS[2], KEYS[3], ARGV[2], sid)
return {'requeued', new_sid}
"""

# KEYS: job, input; ARGV: owner
# -> {'cancelled'} | {'already'} | {'conflict', state} | {'missing'} (also: another owner's job)
_CANCEL = _PRELUDE + """
local f = redis.call('HMGET', KEYS[1], 'state', 'owner')
local state = f[1]
if not state or (f[2] or '') ~= ARGV[1] then return {'missing'} end
if state == 'cancelled' then return {'already'} end
if state ~= 'queued' then return {'conflict', state} end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', now())
redis.call('DEL', KEYS[2])
-- The stream entry stays: the consumer that reads it sees 'cancelled', skips it and acks it.
return {'cancelled'}
"""

# Keep the entry of a job this consumer runs from looking abandoned: reset its idle time
# (XCLAIM to itself, JUSTID: the delivery count stays), so XAUTOCLAIM leaves it alone.
# KEYS: job, stream; ARGV: stream_id, group, consumer -> 1 kept fresh | 0 not this consumer's to keep
_TOUCH = _PRELUDE + """
if not running_here(KEYS[1], ARGV[1], ARGV[3]) then return 0 end
-- XCLAIM drops a trimmed entry from the PEL, and with it the job's recovery if this worker dies.
if #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1]) == 0 then return 0 end
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[1], 'JUSTID')
return 1
"""

# Record the tiles done of a job this consumer runs. Guarded like touch: a late write from a
# consumer that lost the job would show another attempt's progress, and one after the record
# expired would recreate it as a bare hash without a TTL.
# KEYS: job; ARGV: stream_id, consumer, done, total -> 1 stored | 0 not this consumer's running job
_PROGRESS = _PRELUDE + """
if not running_here(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'progress_done', ARGV[3], 'progress_total', ARGV[4])
return 1
"""

# Remove consumers that hold nothing: this one (ARGV[2]) or all idle >= ARGV[3] ms. Atomic, so a
# consumer can never be deleted with entries pending (XGROUP DELCONSUMER would drop them).
# KEYS: stream; ARGV: group, consumer ('' = any idle one), min_idle_ms -> number removed
_FORGET = """
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
local n = 0
for _, c in ipairs(consumers) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if pending == 0 and ((ARGV[2] ~= '' and name == ARGV[2])
                       or (ARGV[2] == '' and idle >= tonumber(ARGV[3]))) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    n = n + 1
  end
end
return n
"""


# -- data ----------------------------------------------------------------------------------------
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
    state: str
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
            state=h.get("state") or "queued",
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
            progress=(int(h.get("progress_done") or 0), int(h["progress_total"] or 0))
            if h.get("progress_total") else None,
        )

    @classmethod
    def from_pairs(cls, pairs: Sequence[Any]) -> "JobRecord":
        """From a script's HGETALL reply: a flat field, value, ... list."""
        return cls.from_hash(dict(zip(pairs[::2], pairs[1::2])))


@dataclass(frozen=True)
class Submitted:
    job: JobRecord
    created: bool  # False: an existing job returned for the same Idempotency-Key


class QueueFull(Exception):
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
        self._submit = redis.register_script(_SUBMIT)
        self._start = redis.register_script(_START)
        self._complete = redis.register_script(_COMPLETE)
        self._fail = redis.register_script(_FAIL)
        self._requeue = redis.register_script(_REQUEUE)
        self._cancel = redis.register_script(_CANCEL)
        self._touch = redis.register_script(_TOUCH)
        self._progress = redis.register_script(_PROGRESS)
        self._forget = redis.register_script(_FORGET)
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
            raise QueueFull(int(value))
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

    async def touch(self, delivery: Delivery, consumer: str) -> bool:
        """Reset the idle time of the entry of a job ``consumer`` is running (the heartbeat); False
        when it is not this consumer's running job any more, or its entry was trimmed."""
        reply = await self._touch(keys=[job_key(delivery.job_id), STREAM],
                                  args=[delivery.stream_id, GROUP, consumer])
        return int(reply) == 1

    async def progress(self, delivery: Delivery, consumer: str, done: int, total: int) -> bool:
        """Record that ``done`` of ``total`` tiles of the job ``consumer`` runs are computed; False
        (nothing written) when it is not this consumer's running job any more."""
        reply = await self._progress(keys=[job_key(delivery.job_id)],
                                     args=[delivery.stream_id, consumer, done, total])
        return int(reply) == 1

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
