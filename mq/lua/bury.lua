-- ARGV: group, source ('0', '1', '2' or 'inbox'), entry id, dead-letter key, reason, deliveries.
local group, src, id = ARGV[1], ARGV[2], ARGV[3]
local key, loc = INBOX, ''
if src ~= 'inbox' then
  key = Q[tonumber(src) + 1]
  loc = src .. '|' .. id
end
return bury(key, group, id, ARGV[4], ARGV[5], ARGV[6], loc, now_ms())
