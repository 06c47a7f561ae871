-- What observers see of several users, in one command instead of one per user.
-- KEYS[1..n] - the users' hashes
-- Returns each user's presence frame (the hash's view field), or false for a user
-- never seen. On Redis Cluster all KEYS must share a slot: the caller groups them.
local views = {}
for i, key in ipairs(KEYS) do
  views[i] = redis.call('HGET', key, 'view')
end
return views
