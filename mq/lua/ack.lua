-- ARGV: group, then per message: priority, entry id, call id. Acking twice is harmless.
local group = ARGV[1]
for i = 2, #ARGV, 3 do
  ack_entry(group, tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2])
end
return 1
