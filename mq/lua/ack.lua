-- ARGV: group, then per message: priority, entry id, call id. Acking twice is harmless.
local group = ARGV[1]
for i = 2, #ARGV, 3 do
  local p, id, cid = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2]
  local key = Q[p + 1]
  redis.call('XACK', key, group, id)
  redis.call('XDEL', key, id)
  forget(cid, p .. '|' .. id)
end
return 1
