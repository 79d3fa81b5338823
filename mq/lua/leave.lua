-- ARGV: group, consumer. Removes the consumer from each group where it holds nothing.
for _, key in ipairs({Q[1], Q[2], Q[3], INBOX}) do
  if redis.call('EXISTS', key) == 1 then
    local held = redis.pcall('XPENDING', key, ARGV[1], '-', '+', 1, ARGV[2])
    if type(held) == 'table' and not held.err and #held == 0 then
      redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], ARGV[2])
    end
  end
end
return 1
