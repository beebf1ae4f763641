-- Response cache lookup, and the single-flight lock when the entry is missing: one round trip.
-- KEYS: 1 the entry (hash: t = stored at, ms of Redis TIME; v = the encoded entry), 2 the lock,
--       3 the "someone waits" flag.
-- ARGV: 1 read (1/0), 2 max age ms (-1: any), 3 lock token ('' = take no lock), 4 lock TTL ms,
--       5 the largest entry returned inline (bytes).
-- Returns {1, age ms, entry} a hit; {4, age ms} a hit too large to return here (the caller reads `v`
-- on another connection); {2} the lock is ours (go upstream); {3} another request holds it (the flag
-- is set, so its owner publishes when it is done); {0} no entry and no lock asked.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == '1' then
  local stored = redis.call('HGET', KEYS[1], 't')
  if stored then
    local age = now - (tonumber(stored) or now)
    local max = tonumber(ARGV[2])
    if max < 0 or age <= max then
      if redis.call('HSTRLEN', KEYS[1], 'v') > tonumber(ARGV[5]) then return {4, age} end
      return {1, age, redis.call('HGET', KEYS[1], 'v')}
    end
  end
end
if ARGV[3] == '' then return {0} end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then return {2} end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
return {3}
