-- Record one attempt's outcome for a deployment's shared circuit breaker.
-- KEYS: 1 = health HASH (fails, open_until, ejections, last_change), 2 = probe lock key.
-- ARGV: 1 outcome: "ok" | "fail" | "throttle"; 2 retry-after ms (throttle); 3 failure threshold;
--       4 base ejection ms; 5 max ejection ms; 6 jitter in [0,1) supplied by the caller.
-- An "ok" closes an open circuit only at or after open_until (the half-open probe's success).
-- Returns {state, open_until_ms, ejections} with state 0 closed, 1 open; 2 = state changed now.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = KEYS[1]
local outcome = ARGV[1]
local fails = tonumber(redis.call('HGET', h, 'fails') or '0')
local open_until = tonumber(redis.call('HGET', h, 'open_until') or '0')
local ejections = tonumber(redis.call('HGET', h, 'ejections') or '0')
local changed = 0
if outcome == 'ok' then
  -- An open circuit closes only once its ejection (or Retry-After) is over: a success before then
  -- is a request that was already in flight when it opened, or one sent in panic mode.
  fails = 0
  if open_until <= now then  -- closed already, or the half-open probe succeeded
    if open_until > 0 then changed = 1 end
    open_until = 0
    redis.call('DEL', KEYS[2])
  end
else
  local eject_for = 0
  if outcome == 'throttle' and tonumber(ARGV[2]) > 0 then
    eject_for = tonumber(ARGV[2])
  else
    fails = fails + 1
    if fails >= tonumber(ARGV[3]) or (open_until > 0 and now >= open_until) then
      -- threshold reached, or the half-open probe failed: eject longer each time, with jitter
      eject_for = math.min(tonumber(ARGV[4]) * (ejections + 1), tonumber(ARGV[5]))
      eject_for = math.floor(eject_for * (0.9 + 0.2 * tonumber(ARGV[6])))
    end
  end
  if eject_for > 0 then
    if open_until == 0 or now >= open_until then changed = 1 end
    open_until = math.max(open_until, now + eject_for)
    ejections = ejections + 1
    fails = 0
    redis.call('DEL', KEYS[2])
  end
end
redis.call('HSET', h, 'fails', fails, 'open_until', open_until, 'ejections', ejections, 'updated', now)
redis.call('PEXPIRE', h, 3600000)
local state = (open_until > now) and 1 or 0
return {state + 2 * changed, open_until, ejections, now}
