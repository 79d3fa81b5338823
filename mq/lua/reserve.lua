-- ARGV: group, consumer, count, reservation ms, max deliveries, reclaim every ms, promote limit,
-- the reason of a message buried for too many deliveries (a format of its count, %d),
-- then per message to ack first (as ack.lua): priority, entry id, call id.
-- Returns {messages, inbox entries, wait, buried}: a message is {priority, entry id, deliveries,
-- fields}; an inbox entry is {entry id, deliveries, fields}; wait is false unless nothing was
-- found, then the longest useful wait in ms (the next sweep or delayed entry), or -1 for no
-- limit; buried is {call id, reason} of each message with an id that step 2 buried.
local group, consumer = ARGV[1], ARGV[2]
local count, reservation = tonumber(ARGV[3]), tonumber(ARGV[4])
local maxd, every, promote = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local lapsed = ARGV[8]
local now = now_ms()

-- 0. the consumer's finished messages
for i = 9, #ARGV, 3 do
  ack_entry(group, tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2])
end

-- 1. delayed entries whose time has come join their ready stream
for _, eid in ipairs(redis.call('ZRANGEBYSCORE', DUE, '-inf', now, 'LIMIT', 0, promote)) do
  redis.call('ZREM', DUE, eid)
  local f = fields_of(LATER, eid)
  if f then
    redis.call('XDEL', LATER, eid)
    place(f, field(f, 'id'), 0, now)
  end
end

-- 2. lapsed reservations (one consumer sweeps every `every` ms), then new entries, by priority
local reclaim = now >= tonumber(redis.call('HGET', META, 'reclaim_at') or '0')
local more = false
local out, raw, buried = {}, {}, {}

local function sweep(key, cursor_name, want, take)
  local cursor = redis.call('HGET', META, cursor_name) or '0-0'
  local r = redis.call('XAUTOCLAIM', key, group, consumer, reservation, cursor, 'COUNT', want)
  redis.call('HSET', META, cursor_name, r[1])
  if r[1] ~= '0-0' then more = true end
  for _, e in ipairs(r[2]) do
    if type(e) == 'table' and type(e[2]) == 'table' then
      local _, times = holder(key, group, e[1])
      take(e[1], e[2], tonumber(field(e[2], '_n') or '0') or 0, times)
    elseif type(e) == 'table' then
      redis.call('XACK', key, group, e[1])  -- Redis 6.2 reports deleted entries as nil
    end
  end
end

for p = 2, 0, -1 do
  local key = Q[p + 1]
  if reclaim and #out < count then
    sweep(key, 'cursor:' .. p, count - #out, function(id, f, prior, times)
      local d = prior + times
      if d > maxd then
        local cid = field(f, 'id')
        local reason = string.format(lapsed, d - 1)
        if bury(key, group, id, cid or ('q' .. p .. '-' .. id), reason, d - 1, p .. '|' .. id,
            now) == 1 and cid then
          buried[#buried + 1] = {cid, reason}
        end
      else
        out[#out + 1] = {p, id, d, f}
      end
    end)
  end
  if #out < count then
    local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count - #out,
      'STREAMS', key, '>')
    if r then
      for _, e in ipairs(r[1][2]) do
        out[#out + 1] = {p, e[1], (tonumber(field(e[2], '_n') or '0') or 0) + 1, e[2]}
      end
    end
  end
end

-- 3. producers' entries, for the caller to validate and route
if #out < count then
  if reclaim then
    sweep(INBOX, 'cursor:inbox', count, function(id, f, _, times)
      if times > maxd then
        bury(INBOX, group, id, 'inbox-' .. id, 'could not be routed after ' .. (times - 1) ..
          ' attempt(s)', times - 1, '', now)
      else
        raw[#raw + 1] = {id, times, f}
      end
    end)
  end
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', math.max(count, 100),
    'STREAMS', INBOX, '>')
  if r then
    for _, e in ipairs(r[1][2]) do raw[#raw + 1] = {e[1], 1, e[2]} end
  end
end

if reclaim and not more then redis.call('HSET', META, 'reclaim_at', now + every) end
if #out > 0 or #raw > 0 then return {out, raw, false, buried} end

-- 4. nothing: how long blocking for new entries is useful at most
local wait = -1
for _, key in ipairs({Q[3], Q[2], Q[1], INBOX}) do
  if redis.call('XPENDING', key, group)[1] > 0 then
    local at = tonumber(redis.call('HGET', META, 'reclaim_at') or '0')
    wait = math.max(at - now, 1)
  end
end
local first = redis.call('ZRANGE', DUE, 0, 0, 'WITHSCORES')
if #first > 0 then
  local until_due = math.max(tonumber(first[2]) - now, 1)
  if wait < 0 or until_due < wait then wait = until_due end
end
return {out, raw, wait, buried}
