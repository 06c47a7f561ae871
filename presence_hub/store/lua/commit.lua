-- Commits one user's transition (one input, or several folded together), computed
-- by the rules from the state read at revision ARGV[1], unless another writer
-- committed in between (optimistic concurrency: the caller re-reads and retries).
-- Publishes what changed.
-- KEYS[1] - the user's hash: rev (integer), state (blob), view (presence frame)
-- KEYS[2] - the timer bucket of the user's partition (sorted set: member -> due time)
-- KEYS[3] - the change log of the user's partition (stream: m = member, f = frame)
-- KEYS[4..] - the idempotency records of the producer events applied, if any
-- ARGV[1] - the revision the transition was computed from (0 for a new user)
-- ARGV[2] - the new state blob, or "" when the state itself did not change
-- ARGV[3] - the new presence frame (observer view), or "" when it did not change
-- ARGV[4] - what to publish on the self channel, or "" when the self view did not change
-- ARGV[5] - the timer member (tenant:user)
-- ARGV[6] - the next due time, or "" for none
-- ARGV[7] - the presence channel
-- ARGV[8] - the self channel
-- ARGV[9] - how long to remember the events, in seconds
-- ARGV[10] - what to publish on the presence channel (the frame and its origin time)
-- ARGV[11] - PUBLISH, or SPUBLISH on a cluster (the channels are in KEYS[1]'s slot)
-- ARGV[12] - how long the change log keeps a change, in milliseconds (0: no log)
-- ARGV[13] - the presence channel's witness on the committing node's listening connection,
--            or "": that node hands the frame to its own watchers itself, and the witness
--            has a subscriber exactly while that connection has the presence channel
-- ARGV[14..] - each event's result, to remember, in the order of KEYS[4..]
-- Returns the revision now stored, -1 on a conflict, -2 if an event was seen before
-- (then nothing is written).
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then
  return -1
end
for i = 4, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return -2
  end
end
for i = 4, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 10], 'EX', ARGV[9])
end
if ARGV[2] ~= '' then
  rev = rev + 1
  redis.call('HSET', KEYS[1], 'rev', rev, 'state', ARGV[2])
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'view', ARGV[3])
  -- Published unless the committing node's own connection is the channel's only listener.
  local others = 1
  if ARGV[13] ~= '' then
    local listeners = redis.call('PUBSUB', 'NUMSUB', ARGV[7])[2]
    local mine = redis.call('PUBSUB', 'NUMSUB', ARGV[13])[2]
    others = listeners - math.min(mine, 1)
  end
  if others > 0 then
    redis.call(ARGV[11], ARGV[7], ARGV[10])
  end
  local retention = tonumber(ARGV[12])
  if retention > 0 then
    -- In the same step as the change itself: the feed has every change and no other.
    -- Trimmed as it grows (MINID ~: whole macro nodes, cheaply), never by a sweep.
    local now = redis.call('TIME')
    local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    redis.call('XADD', KEYS[3], 'MINID', '~', ms - retention, '*', 'm', ARGV[5], 'f', ARGV[3])
  end
end
if ARGV[4] ~= '' then
  redis.call(ARGV[11], ARGV[8], ARGV[4])
end
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
else
  redis.call('ZREM', KEYS[2], ARGV[5])
end
return rev
