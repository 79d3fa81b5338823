-- ARGV: group, idle ms (past the reservation), then per entry: priority, entry id.
-- Entries a blocking read gave this consumer beyond what it wanted go back in their place:
-- pending for no consumer (BACK), idle as if lapsed and with the delivery taken back, so
-- that the next sweep hands them out first, uncharged. (A release would put them at the end
-- of their stream, behind newer entries of their priority.)
local group, idle = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  local p, id = tonumber(ARGV[i]), ARGV[i + 1]
  local key = Q[p + 1]
  local _, times = holder(key, group, id)
  if times > 0 then
    redis.call('XCLAIM', key, group, BACK, 0, id, 'IDLE', idle, 'RETRYCOUNT', times - 1, 'JUSTID')
    redis.call('HSET', META, 'cursor:' .. p, '0-0')
  end
end
redis.call('HSET', META, 'reclaim_at', 0)  -- the next reserve sweeps
return 1
