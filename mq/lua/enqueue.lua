-- ARGV: group, n, then per message: call id, delay ms, inbox entry ('' if none), field count, fields...
-- (no fields: the inbox entry is a `_wake` one, dropped); then, optionally, a consumer and a
-- count: that consumer also takes up to count new ready entries, by priority (a consumer that
-- routes producers' entries while it waits for calls needs no reserve of its own for them).
-- Returns per message 1 (queued) or 0 (the id was already queued, delayed or reserved); with a
-- consumer, {those, taken}, each taken entry {priority, entry id, fields}.
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
if pos > #ARGV then return out end
local consumer, want = ARGV[pos], tonumber(ARGV[pos + 1])
local taken = {}
for p = 2, 0, -1 do
  if #taken >= want then break end
  -- pcall: a stream without the group (deleted meanwhile) is mended by the next reserve
  local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want - #taken,
    'STREAMS', Q[p + 1], '>')
  if type(r) == 'table' and r[1] then
    for _, e in ipairs(r[1][2]) do taken[#taken + 1] = {p, e[1], e[2]} end
  end
end
return {out, taken}
