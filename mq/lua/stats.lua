-- ARGV: group. Returns {ready, delayed, reserved, dead}, read at one instant. Ready counts
-- the producers' entries not routed yet, but not the wake-up entry (enqueue.lua).
local ready, reserved = 0, 0
for p = 1, 3 do
  ready = ready + redis.call('XLEN', Q[p])
  local pending = redis.call('XPENDING', Q[p], ARGV[1])
  reserved = reserved + pending[1]
  for _, c in ipairs(pending[4] or {}) do  -- handed back in place: ready, held by no one
    if c[1] == BACK then reserved = reserved - tonumber(c[2]) end
  end
end
local inbox = redis.call('XLEN', INBOX)
local wake = redis.call('HGET', META, 'wake')
if wake and #redis.call('XRANGE', INBOX, wake, wake) > 0 then inbox = inbox - 1 end
return {ready - reserved + inbox, redis.call('ZCARD', DUE), reserved, redis.call('XLEN', DEAD)}
