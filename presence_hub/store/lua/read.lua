-- Several users' states and whether producer event ids were seen, in one command
-- instead of two per event.
-- KEYS[1..n]   - the users' hashes (n = ARGV[1])
-- KEYS[n+1..]  - event-id keys
-- ARGV[1+i]    - the revision of user i whose state the caller holds already, or ''
-- Returns rev and state of each user in turn (false where the user was never seen;
-- 1 instead of the state where it is still at the caller's revision), then 1 or 0
-- for each event key. On Redis Cluster all KEYS must share a slot: the caller groups
-- them by partition.
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  local fields = redis.call('HMGET', KEYS[i], 'rev', 'state')
  out[#out + 1] = fields[1]
  if fields[1] and fields[1] == ARGV[1 + i] then
    out[#out + 1] = 1
  else
    out[#out + 1] = fields[2]
  end
end
for i = n + 1, #KEYS do
  out[#out + 1] = redis.call('EXISTS', KEYS[i])
end
return out
