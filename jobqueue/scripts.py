"""The Lua scripts of the job queue: every state transition is one script, so it is atomic and
re-running it is harmless. :class:`jobqueue.queue.JobQueue` registers and calls them.

State machine::

    queued --start--> running --complete--> succeeded
      |                  |----fail (permanent)----------------> failed
      |                  |----fail (retryable, attempts left)--> queued (new stream entry)
      |                  |----fail (retryable, no attempts left)--> failed + dead letter
      |                  '----release (graceful shutdown)-----> queued (new entry, attempt refunded)
      '--cancel--> cancelled <--cancel-- running (its consumer notices and drops its tiles)
    queued|running --start with attempts >= max_attempts (reclaimed)--> failed + dead letter

The state strings are those of :class:`jobqueue.keys.JobState`.
"""

from __future__ import annotations

# Shared prelude: server time, ack of the entry in hand, whether a job is live (start, requeue) or
# running on a consumer for a given entry (touch, progress), enqueueing, dead letters.
PRELUDE = """
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
-- The shared check at the top of start and requeue: a job that is gone or final has nothing left
-- to deliver, so its entry is acked. Returns the job's fields (state first) when it is live, else
-- nil and the reason ('missing' or the final state).
local function live_job(job, stream, inflight, group, sid, ...)
  local f = redis.call('HMGET', job, 'state', ...)
  if not f[1] then
    ack(stream, inflight, group, sid)
    return nil, 'missing'
  end
  if f[1] ~= 'queued' and f[1] ~= 'running' then
    ack(stream, inflight, group, sid)
    return nil, f[1]
  end
  return f
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
SUBMIT = PRELUDE + """
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
START = PRELUDE + """
local sid = ARGV[1]
local f, skip = live_job(KEYS[1], KEYS[3], KEYS[4], ARGV[2], sid, 'stream_id', 'consumer')
if not f then return {'skip', skip} end
local state = f[1]
if f[2] ~= sid then
  -- Not the job's current entry: another one was queued meanwhile and is the one that runs.
  ack(KEYS[3], KEYS[4], ARGV[2], sid)
  return {'skip', 'superseded'}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local input = redis.call('GET', KEYS[2])
if state == 'running' and f[3] == ARGV[3] and input then
  -- This consumer started this delivery already (a retried call whose reply was lost): the same
  -- attempt, not another one.
  local g = redis.call('HMGET', KEYS[1], 'options', 'input_content_type', 'created_at')
  return {'run', attempts, input, g[1], g[2], g[3]}
end
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
COMPLETE = PRELUDE + """
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
FAIL = PRELUDE + """
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
# whose stream data was trimmed away), refunding the attempt when asked. A refunded running job
# says so in its error (code 'interrupted'): its attempt count alone would hide that it ran.
# KEYS: job, stream, inflight
# ARGV: stream_id, group, consumer ('' = any), refund ('1'/'0'), maxlen, job_id
# -> {'requeued', new_sid} | {'skip', reason}
REQUEUE = PRELUDE + """
local sid = ARGV[1]
local f, skip = live_job(KEYS[1], KEYS[2], KEYS[3], ARGV[2], sid, 'consumer', 'attempts', 'stream_id')
if not f then return {'skip', skip} end
local state = f[1]
if f[4] ~= sid or (ARGV[3] ~= '' and state == 'running' and f[2] ~= ARGV[3]) then
  -- Another worker reclaimed it meanwhile: it is theirs now; acking here would drop their entry.
  return {'skip', 'not_owner'}
end
local attempts = tonumber(f[3] or '0')
if ARGV[4] == '1' and state == 'running' and attempts > 0 then
  attempts = attempts - 1
  redis.call('HSET', KEYS[1], 'error_code', 'interrupted', 'error_message',
             'the worker running it shut down; queued again to start over (that attempt is not counted)')
end
local new_sid = enqueue(KEYS[2], KEYS[3], ARGV[5], ARGV[6])
redis.call('HSET', KEYS[1], 'state', 'queued', 'stream_id', new_sid, 'attempts', attempts)
ack(KEYS[2], KEYS[3], ARGV[2], sid)
return {'requeued', new_sid}
"""

# A queued or running job becomes cancelled. A running job's consumer learns it from its next
# touch or progress write (they answer -1) and drops the job's remaining tiles.
# KEYS: job, input; ARGV: owner
# -> {'cancelled'} | {'already'} | {'conflict', state} | {'missing'} (also: another owner's job)
CANCEL = PRELUDE + """
local f = redis.call('HMGET', KEYS[1], 'state', 'owner')
local state = f[1]
if not state or (f[2] or '') ~= ARGV[1] then return {'missing'} end
if state == 'cancelled' then return {'already'} end
if state ~= 'queued' and state ~= 'running' then return {'conflict', state} end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', now())
redis.call('HDEL', KEYS[1], 'progress_done', 'progress_total')
redis.call('DEL', KEYS[2])
-- The stream entry stays: the consumer that reads it sees 'cancelled', skips it and acks it; the
-- one running it acks it when it lets go (requeue finds the job final).
return {'cancelled'}
"""

# Keep the entry of a job this consumer runs from looking abandoned: reset its idle time
# (XCLAIM to itself, JUSTID: the delivery count stays), so XAUTOCLAIM leaves it alone.
# KEYS: job, stream; ARGV: stream_id, group, consumer
# -> 1 kept fresh | 0 not this consumer's to keep | -1 cancelled: stop running it
TOUCH = PRELUDE + """
if redis.call('HGET', KEYS[1], 'state') == 'cancelled' then return -1 end
if not running_here(KEYS[1], ARGV[1], ARGV[3]) then return 0 end
-- XCLAIM drops a trimmed entry from the PEL, and with it the job's recovery if this worker dies.
if #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1]) == 0 then return 0 end
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[1], 'JUSTID')
return 1
"""

# Record the tiles done of a job this consumer runs. Guarded like touch: a late write from a
# consumer that lost the job would show another attempt's progress, and one after the record
# expired would recreate it as a bare hash without a TTL.
# KEYS: job; ARGV: stream_id, consumer, done, total
# -> 1 stored | 0 not this consumer's running job | -1 cancelled: stop running it
PROGRESS = PRELUDE + """
if redis.call('HGET', KEYS[1], 'state') == 'cancelled' then return -1 end
if not running_here(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'progress_done', ARGV[3], 'progress_total', ARGV[4])
return 1
"""

# Remove consumers that hold nothing: this one (ARGV[2]) or all idle >= ARGV[3] ms. Atomic, so a
# consumer can never be deleted with entries pending (XGROUP DELCONSUMER would drop them).
# KEYS: stream; ARGV: group, consumer ('' = any idle one), min_idle_ms -> number removed
FORGET = """
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
