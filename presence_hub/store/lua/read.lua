-- Several users' states and whether producer event ids were seen, in one command
-- instead of two per event.
-- KEYS[1..n]   - the users' hashes (n = ARGV[1])
-- KEYS[n+1..]  - event-id keys
-- Returns rev and state of each user in turn (false where the user was never seen),
-- then 1 or 0 for each event key. On Redis Cluster all KEYS must share a slot: the
-- caller groups them by partition.
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  local fields = redis.call('HMGET', KEYS[i], 'rev', 'state')
  out[#out + 1] = fields[1]
  out[#out + 1] = fields[2]
end
for i = n + 1, #KEYS do
  out[#out + 1] = redis.call('EXISTS', KEYS[i])
end
return out
