-- Claims the due members of timer buckets, so that of several nodes polling at
-- once each member is fired by one. A claimed member is pushed back to ARGV[3]:
-- if the claiming node dies before it commits, another fires it then.
-- KEYS - the timer buckets (sorted sets: tenant:user -> due time); several only
--        where they may share a script (a single Redis, not a cluster)
-- ARGV[1] - now
-- ARGV[2] - at most this many members per bucket
-- ARGV[3] - when a claimed member becomes due again if nobody commits it
-- Returns the earliest due time left in the buckets ("" if none), then the
-- claimed members.
local now = tonumber(ARGV[1])
local result = {''}
local earliest = nil
for _, bucket in ipairs(KEYS) do
  local first = redis.call('ZRANGE', bucket, 0, 0, 'WITHSCORES')
  if first[2] ~= nil and tonumber(first[2]) <= now then
    local due = redis.call('ZRANGEBYSCORE', bucket, '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
    for _, member in ipairs(due) do
      redis.call('ZADD', bucket, ARGV[3], member)
      result[#result + 1] = member
    end
    first = redis.call('ZRANGE', bucket, 0, 0, 'WITHSCORES')
  end
  if first[2] ~= nil and (earliest == nil or tonumber(first[2]) < earliest) then
    earliest = tonumber(first[2])
    result[1] = first[2]
  end
end
return result
