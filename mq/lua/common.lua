-- Prelude of every fnq queue script. Every script gets the same keys:
local Q = {KEYS[1], KEYS[2], KEYS[3]}  -- ready streams, priority 0, 1, 2 (index = priority + 1)
local INBOX = KEYS[4]                   -- producers' stream, routed by the consumers
local LATER = KEYS[5]                   -- stream of delayed entries
local DUE = KEYS[6]                     -- zset: LATER entry id -> due time (ms)
local IDS = KEYS[7]                     -- hash: call id -> "<priority>|<entry>" or "L|<entry>"
local DEAD = KEYS[8]                    -- stream of dead letters
local DEADIDS = KEYS[9]                 -- hash: dead-letter key -> DEAD entry id
local META = KEYS[10]                   -- hash: reclaim_at, reclaim cursors
local WAKE = '_wake'                    -- the only field of an INBOX entry that wakes consumers
local BACK = '_back'                    -- holds the entries handed back in place (handback.lua)

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fields_of(key, id)
  local r = redis.call('XRANGE', key, id, id)
  if #r == 0 then return nil end
  return r[1][2]
end

local function field(f, name)
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end

-- A copy of f without the fields named in drop (a set), then extra pairs appended.
local function rewrite(f, drop, extra)
  local out = {}
  for i = 1, #f, 2 do
    if not drop[f[i]] then
      out[#out + 1] = f[i]
      out[#out + 1] = f[i + 1]
    end
  end
  for i = 1, #extra do out[#out + 1] = extra[i] end
  return out
end

local function priority_of(f)
  local p = tonumber(field(f, 'priority') or '0')
  if p == 2 or p == 1 then return p end
  return 0
end

-- Forget the id -> location entry, but only if it still points at loc.
local function forget(cid, loc)
  if cid and redis.call('HGET', IDS, cid) == loc then redis.call('HDEL', IDS, cid) end
end

-- Move entry id of stream src to the dead letters under key. Returns 1, or 0 if it was gone.
local function bury(src, group, id, key, reason, deliveries, loc, now)
  redis.call('XACK', src, group, id)
  local f = fields_of(src, id)
  if not f then return 0 end
  redis.call('XDEL', src, id)
  forget(field(f, 'id'), loc)
  local old = redis.call('HGET', DEADIDS, key)
  if old then redis.call('XDEL', DEAD, old) end
  local meta = {'_key', key, '_reason', reason, '_deliveries', tostring(deliveries), '_died', tostring(now)}
  local nid = redis.call('XADD', DEAD, '*', unpack(rewrite(f, {_key = true, _reason = true,
    _deliveries = true, _died = true}, meta)))
  redis.call('HSET', DEADIDS, key, nid)
  return 1
end

-- Put fields f on the ready stream of its priority, or on LATER when delay_ms > 0.
local function place(f, cid, delay_ms, now)
  local loc
  if delay_ms > 0 then
    local eid = redis.call('XADD', LATER, '*', unpack(f))
    redis.call('ZADD', DUE, now + delay_ms, eid)
    loc = 'L|' .. eid
  else
    local p = priority_of(f)
    loc = p .. '|' .. redis.call('XADD', Q[p + 1], '*', unpack(f))
  end
  if cid then redis.call('HSET', IDS, cid, loc) end
  return loc
end

-- The consumer of a pending entry, or nil when nobody holds it.
local function holder(key, group, id)
  local p = redis.call('XPENDING', key, group, id, id, 1)
  if #p == 0 then return nil, 0 end
  return p[1][2], tonumber(p[1][4])
end

-- Whether consumer still holds this delivery (the deliveries count tells redeliveries apart).
local function holds(key, group, id, consumer, deliveries)
  local who, times = holder(key, group, id)
  if who ~= consumer then return false end
  local f = fields_of(key, id)
  local prior = f and (tonumber(field(f, '_n') or '0') or 0) or 0
  return prior + times == tonumber(deliveries)
end

-- The consumer is done with entry id of priority p (call id cid): it leaves for good.
local function ack_entry(group, p, id, cid)
  local key = Q[p + 1]
  redis.call('XACK', key, group, id)
  redis.call('XDEL', key, id)
  forget(cid, p .. '|' .. id)
end
