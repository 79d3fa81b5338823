-- ARGV: group, consumer, priority, entry id, deliveries. Restarts the reservation clock if
-- this consumer still holds this delivery.
local group, consumer = ARGV[1], ARGV[2]
local key = Q[tonumber(ARGV[3]) + 1]
if not holds(key, group, ARGV[4], consumer, ARGV[5]) then return 0 end
redis.call('XCLAIM', key, group, consumer, 0, ARGV[4], 'JUSTID')
return 1
