-- The end of a request that went upstream: store its answer (when given), release its lock (when it
-- still holds it), and tell waiting replicas (only when one said it waits).
-- KEYS: 1 the entry, 2 the lock, 3 the "someone waits" flag.
-- ARGV: 1 the encoded entry ('' = store nothing), 2 its TTL ms, 3 the lock token ('' = none held),
--       4 the channel, 5 the message (the key's digest).
-- Returns 1 when waiters were told.
if ARGV[1] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 't', now, 'v', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
if redis.call('DEL', KEYS[3]) == 1 then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 1
end
return 0
