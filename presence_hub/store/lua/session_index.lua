-- Records (or, with an empty ARGV[2], forgets) one session in a node's session index.
-- KEYS[1] - the node's sessions hash
-- ARGV[1] - the session id
-- ARGV[2] - tenant:user, or '' to forget the session
if ARGV[2] == '' then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
