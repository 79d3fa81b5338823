-- ARGV: mode ('all' or 'ids'), limit, dead-letter keys...  Moves dead letters back to INBOX,
-- without the queue's bookkeeping fields, so that they are validated and routed afresh, and
-- without their creation time: a requeued call's age starts again (from the new entry's id).
local todo = {}
if ARGV[1] == 'all' then
  for _, e in ipairs(redis.call('XRANGE', DEAD, '-', '+', 'COUNT', tonumber(ARGV[2]))) do
    todo[#todo + 1] = {field(e[2], '_key'), e[1]}
  end
else
  for i = 3, #ARGV do
    local eid = redis.call('HGET', DEADIDS, ARGV[i])
    if eid then todo[#todo + 1] = {ARGV[i], eid} end
  end
end
local n = 0
for _, t in ipairs(todo) do
  local f = fields_of(DEAD, t[2])
  if f then
    local clean = {}
    for i = 1, #f, 2 do
      if string.sub(f[i], 1, 1) ~= '_' and f[i] ~= 'created' then
        clean[#clean + 1] = f[i]
        clean[#clean + 1] = f[i + 1]
      end
    end
    if #clean == 0 then clean = {'_empty', '1'} end
    redis.call('XADD', INBOX, '*', unpack(clean))
    redis.call('XDEL', DEAD, t[2])
    n = n + 1
  end
  if t[1] and redis.call('HGET', DEADIDS, t[1]) == t[2] then redis.call('HDEL', DEADIDS, t[1]) end
end
return n
