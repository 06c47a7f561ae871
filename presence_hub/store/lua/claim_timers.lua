-- Claims the due members of timer buckets, so that of several nodes polling at
-- once each member is fired by one. A claimed member is pushed back to ARGV[3]:
-- if the claiming node dies before it commits, another fires it then.
-- KEYS - the timer buckets (sorted sets: tenant:user -> due time); several only
--        where they may share a script (a single Redis, not a cluster)
-- ARGV[1] - now
-- ARGV[2] - at most this many members per bucket
-- ARGV[3] - when a claimed member becomes due again if nobody commits it
-- Returns the claimed members.
local claimed = {}
for _, bucket in ipairs(KEYS) do
  local due = redis.call('ZRANGEBYSCORE', bucket, '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
  for _, member in ipairs(due) do
    redis.call('ZADD', bucket, ARGV[3], member)
    claimed[#claimed + 1] = member
  end
end
return claimed
