"""Lua scripts of the RQ adapter (mq.rq): every step that must not be torn in half.

Each script gets ``KEYS = [reserved, receipts]`` (fnq's own keys) and starts its
ARGV with the six rq key prefixes of :data:`PREFIX_ORDER`, taken from rq's own
classes at run time, so no rq key name is spelt here. Times are the Redis
server's (``TIME``), so consumers on different hosts agree on expiries.

Reservations: ``reserved`` is a sorted set job id -> expiry (ms); ``receipts``
a hash job id -> token of the delivery holding it (also the rq execution id).
The job hash fields ``fnq_deliveries`` (deliveries) and ``fnq_receipt`` (the token of
its latest delivery) are fnq's; rq ignores them. A reservation whose token is not its
job's ``fnq_receipt`` is a ghost: rq deleted the job it held, or made a new one of the id
(a job with ``fnq_deliveries`` and no ``fnq_receipt`` was claimed by an older fnq: not one).
"""

from __future__ import annotations

PREFIX_ORDER = ("job", "queue", "wip", "exec", "execs", "sched")
N_PREFIX = len(PREFIX_ORDER)

_COMMON = """
local P = {job = ARGV[1], queue = ARGV[2], wip = ARGV[3], exec = ARGV[4],
           execs = ARGV[5], sched = ARGV[6]}
local A = 6
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = now_ms / 1000

local function unreserve(jid, token)
  redis.call('ZREM', KEYS[1], jid)
  redis.call('HDEL', KEYS[2], jid)
  if token and token ~= '' then
    local origin = redis.call('HGET', P.job .. jid, 'origin')
    if origin then redis.call('ZREM', P.wip .. origin, jid .. ':' .. token) end
    redis.call('DEL', P.exec .. jid .. ':' .. token)
    redis.call('ZREM', P.execs .. jid, token)
  end
end

local function requeue(jid)
  local origin = redis.call('HGET', P.job .. jid, 'origin')
  if not origin then return end
  redis.call('HSET', P.job .. jid, 'status', 'queued')
  redis.call('RPUSH', P.queue .. origin, jid)
end

local FINAL = {finished = true, failed = true, canceled = true, stopped = true}

-- The delivery of token holds no job of that id any more: rq deleted the job it
-- reserved (which may have been enqueued again since, as a new job). A job with
-- deliveries but no receipt was claimed before receipts were kept: still the one held.
local function ghost(jid, token)
  local f = redis.call('HMGET', P.job .. jid, 'fnq_receipt', 'fnq_deliveries')
  if f[1] then return f[1] ~= token end
  return not f[2]
end
"""

# ARGV[A+1..]: token_base, count, reservation_ms, max_deliveries, limit, queue names...
# Returns {claimed, doomed, wait_ms, now_ms}: claimed = {{id, queue, token, deliveries,
# hash}...}, doomed = {{id, token, deliveries}...} lapsed too often (kept reserved for the
# caller to fail), wait_ms = ms until the next lapse or scheduled job is due (-1: none),
# now_ms = the server's time.
CLAIM = (
    _COMMON
    + """
local token_base = ARGV[A + 1]
local count = tonumber(ARGV[A + 2])
local res_ms = tonumber(ARGV[A + 3])
local max_del = tonumber(ARGV[A + 4])
local limit = tonumber(ARGV[A + 5])
local names = {}
for i = A + 6, #ARGV do names[#names + 1] = ARGV[i] end

local doomed = {}
for _, jid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, limit)) do
  local token = redis.call('HGET', KEYS[2], jid) or ''
  local jkey = P.job .. jid
  local status = redis.call('HGET', jkey, 'status')
  if redis.call('EXISTS', jkey) == 0 or FINAL[status] or ghost(jid, token) then
    unreserve(jid, token)
  else
    local n = tonumber(redis.call('HGET', jkey, 'fnq_deliveries') or '0')
    if n >= max_del then
      redis.call('ZADD', KEYS[1], now_ms + res_ms, jid)
      doomed[#doomed + 1] = {jid, token, n}
    else
      unreserve(jid, token)
      requeue(jid)
    end
  end
end

for _, name in ipairs(names) do
  local skey = P.sched .. name
  for _, jid in ipairs(redis.call('ZRANGEBYSCORE', skey, 0, now_s, 'LIMIT', 0, limit)) do
    redis.call('ZREM', skey, jid)
    if redis.call('EXISTS', P.job .. jid) == 1 then
      redis.call('HSET', P.job .. jid, 'status', 'queued')
      redis.call('RPUSH', P.queue .. name, jid)
    end
  end
end

local claimed = {}
for _, name in ipairs(names) do
  local qkey = P.queue .. name
  while #claimed < count do
    local jid = redis.call('LPOP', qkey)
    if not jid then break end
    local jkey = P.job .. jid
    local status = redis.call('HGET', jkey, 'status')
    local live = redis.call('EXISTS', jkey) == 1
    local fresh = not status or status == '' or status == 'queued' or status == 'created'
    -- a reserved one is another entry of a job handed out, unless the reservation is a ghost
    local held = redis.call('HGET', KEYS[2], jid)
    if live and fresh and (not held or ghost(jid, held)) then
      if held then unreserve(jid, held) end
      local token = token_base .. string.format('%04x', #claimed)
      local n = redis.call('HINCRBY', jkey, 'fnq_deliveries', 1)
      redis.call('HSET', jkey, 'fnq_receipt', token)
      redis.call('ZADD', KEYS[1], now_ms + res_ms, jid)
      redis.call('HSET', KEYS[2], jid, token)
      claimed[#claimed + 1] = {jid, name, token, n, redis.call('HGETALL', jkey)}
    end
  end
end

local wait = -1
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then wait = math.max(1, tonumber(first[2]) - now_ms) end
for _, name in ipairs(names) do
  local s = redis.call('ZRANGE', P.sched .. name, 0, 0, 'WITHSCORES')
  if s[2] then
    local w = math.max(1, math.floor(tonumber(s[2]) * 1000 - now_ms))
    if wait < 0 or w < wait then wait = w end
  end
end
return {claimed, doomed, wait, now_ms}
"""
)

# ARGV[A+1..]: id, token, reservation_ms, started_ttl_s, heartbeat (rq's text form)
EXTEND = (
    _COMMON
    + """
local jid, token = ARGV[A + 1], ARGV[A + 2]
local res_ms, ttl_s = tonumber(ARGV[A + 3]), tonumber(ARGV[A + 4])
if redis.call('HGET', KEYS[2], jid) ~= token then return 0 end
if ghost(jid, token) then
  unreserve(jid, token)
  return 0
end
redis.call('ZADD', KEYS[1], now_ms + res_ms, jid)
local jkey = P.job .. jid
local origin = redis.call('HGET', jkey, 'origin')
if origin then
  redis.call('ZADD', P.wip .. origin, 'XX', now_s + ttl_s, jid .. ':' .. token)
end
local ekey = P.exec .. jid .. ':' .. token
if redis.call('EXISTS', ekey) == 1 then
  redis.call('HSET', ekey, 'last_heartbeat', now_s)
  redis.call('EXPIRE', ekey, ttl_s)
  redis.call('ZADD', P.execs .. jid, 'XX', now_s + ttl_s + 60, token)
  redis.call('EXPIRE', P.execs .. jid, ttl_s + 60)
end
if redis.call('EXISTS', jkey) == 1 then redis.call('HSET', jkey, 'last_heartbeat', ARGV[A + 5]) end
return 1
"""
)

# ARGV[A+1..]: id, token, delay_s. Hands the job back without charging a delivery; a job
# that ended meanwhile (rq's cancel) only loses the reservation.
RELEASE = (
    _COMMON
    + """
local jid, token, delay = ARGV[A + 1], ARGV[A + 2], tonumber(ARGV[A + 3])
if redis.call('HGET', KEYS[2], jid) ~= token then return 0 end
local jkey = P.job .. jid
unreserve(jid, token)
if ghost(jid, token) or FINAL[redis.call('HGET', jkey, 'status')] then return 0 end
if tonumber(redis.call('HINCRBY', jkey, 'fnq_deliveries', -1)) < 0 then
  redis.call('HSET', jkey, 'fnq_deliveries', 0)
end
if delay <= 0 then
  requeue(jid)
else
  local origin = redis.call('HGET', jkey, 'origin')
  redis.call('HSET', jkey, 'status', 'scheduled')
  redis.call('ZADD', P.sched .. origin, now_s + delay, jid)
end
return 1
"""
)

# ARGV[A+1..]: id, token. Drops the reservation; the job keeps its rq status.
ACK = (
    _COMMON
    + """
local jid, token = ARGV[A + 1], ARGV[A + 2]
if redis.call('HGET', KEYS[2], jid) ~= token then return 0 end
unreserve(jid, token)
return 1
"""
)
