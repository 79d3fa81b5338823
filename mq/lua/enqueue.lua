-- ARGV: group, n, then per message: call id, delay ms, inbox entry ('' if none), field count, fields...
-- Returns per message 1 (queued) or 0 (the id was already queued, delayed or reserved).
local group = ARGV[1]
local n = tonumber(ARGV[2])
local now = now_ms()
local pos = 3
local out = {}
for m = 1, n do
  local cid, delay, src, nf = ARGV[pos], tonumber(ARGV[pos + 1]), ARGV[pos + 2], tonumber(ARGV[pos + 3])
  local f = {}
  for i = 1, nf do f[i] = ARGV[pos + 3 + i] end
  pos = pos + 4 + nf
  if redis.call('HEXISTS', IDS, cid) == 1 then
    out[m] = 0
  else
    place(f, cid, delay, now)
    out[m] = 1
  end
  if src ~= '' then
    redis.call('XACK', INBOX, group, src)
    redis.call('XDEL', INBOX, src)
  end
end
return out
