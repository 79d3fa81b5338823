-- ARGV: group, consumer, priority, entry id, delay ms, deliveries already made (not counting
-- this one). Puts the entry back (at the end of its stream, or on LATER) if this consumer still
-- holds this delivery.
local group, consumer = ARGV[1], ARGV[2]
local p, id, delay, prior = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local key = Q[p + 1]
if not holds(key, group, id, consumer, prior + 1) then return 0 end
local f = fields_of(key, id)
redis.call('XACK', key, group, id)
if not f then return 0 end
redis.call('XDEL', key, id)
local extra = {}
if prior > 0 then extra = {'_n', tostring(prior)} end
local cid = field(f, 'id')
forget(cid, p .. '|' .. id)
place(rewrite(f, {_n = true}, extra), cid, delay, now_ms())
return 1
