-- ARGV: group, n, then per message: call id, delay ms, inbox entry ('' if none), field count, fields...
-- (no fields: the inbox entry is a `_wake` one, dropped).
-- Returns per message 1 (queued) or 0 (the id was already queued, delayed or reserved).
-- A delayed message pushed straight to LATER (not routed from INBOX) adds one `_wake` entry
-- to INBOX: a consumer blocked on the streams wakes, drops it, and waits again only until
-- the earliest due time (it could not know of the new one otherwise). Its id is kept in
-- META (field `wake`), so that statistics leave it out (stats.lua).
local group = ARGV[1]
local n = tonumber(ARGV[2])
local now = now_ms()
local pos = 3
local out = {}
local wake = false
for m = 1, n do
  local cid, delay, src, nf = ARGV[pos], tonumber(ARGV[pos + 1]), ARGV[pos + 2], tonumber(ARGV[pos + 3])
  local f = {}
  for i = 1, nf do f[i] = ARGV[pos + 3 + i] end
  pos = pos + 4 + nf
  if nf == 0 then
    out[m] = 0  -- a `_wake` entry from INBOX: only dropped
  elseif redis.call('HEXISTS', IDS, cid) == 1 then
    out[m] = 0
  else
    place(f, cid, delay, now)
    out[m] = 1
    if delay > 0 and src == '' then wake = true end
  end
  if src ~= '' then
    redis.call('XACK', INBOX, group, src)
    redis.call('XDEL', INBOX, src)
  end
end
if wake then
  -- One in INBOX is enough: while it waits there no consumer is blocked (it would have
  -- been handed the entry), and a consumer that took it looks at the due times again.
  -- So a stream no consumer reads holds one, not one per push.
  local held = redis.call('HGET', META, 'wake')
  if not held or #redis.call('XRANGE', INBOX, held, held) == 0 then
    redis.call('HSET', META, 'wake', redis.call('XADD', INBOX, '*', WAKE, '1'))
  end
end
return out
