-- Claims the due members of one timer bucket, so that of several nodes polling
-- at once each member is fired by one. A claimed member is pushed back to
-- ARGV[3]: if the claiming node dies before it commits, another fires it then.
-- KEYS[1] - the timer bucket (sorted set: tenant:user -> due time)
-- ARGV[1] - now
-- ARGV[2] - at most this many members
-- ARGV[3] - when a claimed member becomes due again if nobody commits it
-- Returns the claimed members.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[3], member)
end
return due
