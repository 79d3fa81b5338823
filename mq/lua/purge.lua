-- ARGV: mode ('all' or 'ids'), dead-letter keys...  Deletes dead letters; returns how many.
if ARGV[1] == 'all' then
  local n = redis.call('XLEN', DEAD)
  redis.call('DEL', DEAD, DEADIDS)
  return n
end
local n = 0
for i = 2, #ARGV do
  local eid = redis.call('HGET', DEADIDS, ARGV[i])
  if eid then
    n = n + redis.call('XDEL', DEAD, eid)
    redis.call('HDEL', DEADIDS, ARGV[i])
  end
end
return n
