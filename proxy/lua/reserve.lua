-- Atomic admission for one request: rate limits in every scope, plus the choice of a deployment
-- that is within its own limits and whose shared circuit breaker lets it serve. All or nothing;
-- Redis TIME is the only clock.
--
-- KEYS: common scope i (1..C): 3 keys at 3(i-1): request log ZSET, token TAT, live-limit HASH.
--       candidate j (1..D): 5 keys at 3C+5(j-1): request log, token TAT, live-limit HASH,
--       health HASH, probe lock. Then, when ARGV[4] > 0, one concurrency ZSET.
-- ARGV: 1 member (unique per reservation), 2 estimated tokens, 3 C, 4 max concurrent (0 = none),
--       5 concurrency lease ms, 6 probe lock ms, then per scope (common first): default rpm,
--       default tpm (-1 = unlimited).
-- Returns {admitted, chosen candidate (1-based, 0 = none), retry_after_ms, now_ms, marker, probe,
--          stats...}; marker 0 ok/limited, -2 concurrency, -3 every candidate at its limit,
--          -4 no candidate may serve now (open circuit / probe in progress);
--          stats per checked scope = {scope index, rpm, rpm remaining, rpm reset ms, tpm,
--          tpm remaining, tpm reset ms}.
local WINDOW = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local tokens = tonumber(ARGV[2])
local C = tonumber(ARGV[3])
local max_conc = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
local probe_ms = tonumber(ARGV[6])
local n = (#ARGV - 6) / 2
local D = n - C

local function base(i)
  if i <= C then return 3 * (i - 1) end
  return 3 * C + 5 * (i - C - 1)
end

local function limits(i)
  local rpm = tonumber(ARGV[5 + 2 * i])
  local tpm = tonumber(ARGV[6 + 2 * i])
  local live = redis.call('HMGET', KEYS[base(i) + 3], 'requests_per_minute', 'tokens_per_minute')
  if live[1] then rpm = tonumber(live[1]) or rpm end
  if live[2] then tpm = tonumber(live[2]) or tpm end
  return rpm, tpm
end

-- What check() read, for apply(): the script is atomic, so nothing can change it in between.
local seen_rpm, seen_tpm, seen_tat = {}, {}, {}

local function check(i)
  local rpm, tpm = limits(i)
  seen_rpm[i], seen_tpm[i] = rpm, tpm
  local ok, retry = true, 0
  local stats = {i, -1, -1, 0, -1, -1, 0}
  local b = base(i)
  if rpm and rpm >= 0 then
    local log = KEYS[b + 1]
    redis.call('ZREMRANGEBYSCORE', log, '-inf', now - WINDOW)
    local count = redis.call('ZCARD', log)
    local reset = WINDOW
    if count > 0 then
      local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
      reset = tonumber(oldest[2]) + WINDOW - now
    end
    if count >= rpm then
      ok = false
      if rpm == 0 then
        retry = WINDOW
      else
        local nth = redis.call('ZRANGE', log, count - rpm, count - rpm, 'WITHSCORES')
        retry = math.max(retry, tonumber(nth[2]) + WINDOW - now)
      end
    end
    stats[2], stats[3], stats[4] = rpm, math.max(0, rpm - count - 1), reset
  end
  if tpm and tpm >= 0 then
    local tat = tonumber(redis.call('GET', KEYS[b + 2]) or '0')
    if tat < now then tat = now end
    seen_tat[i] = tat
    local new_tat = tat
    if tpm > 0 then new_tat = tat + math.min(tokens, tpm) * WINDOW / tpm end
    if tpm == 0 or new_tat - now > WINDOW then
      ok = false
      retry = math.max(retry, tpm == 0 and WINDOW or math.ceil(new_tat - now - WINDOW))
    end
    local used = (tpm > 0) and math.floor((new_tat - now) * tpm / WINDOW) or 0
    stats[5], stats[6], stats[7] = tpm, math.max(0, tpm - used), math.ceil(new_tat - now)
  end
  return ok, retry, stats
end

local function apply(i)
  local rpm, tpm = seen_rpm[i], seen_tpm[i]
  local b = base(i)
  if rpm and rpm >= 0 then
    redis.call('ZADD', KEYS[b + 1], now, member)
    redis.call('PEXPIRE', KEYS[b + 1], WINDOW + 1000)
  end
  if tpm and tpm > 0 then
    local tat = seen_tat[i] + math.min(tokens, tpm) * WINDOW / tpm
    redis.call('SET', KEYS[b + 2], tostring(tat), 'PX', math.ceil(tat - now) + WINDOW)
  end
end

local result = {}
local retry = 0
for i = 1, C do
  local ok, r, stats = check(i)
  for _, v in ipairs(stats) do table.insert(result, v) end
  if not ok then retry = math.max(retry, r) end
end
if max_conc > 0 then
  local ck = KEYS[#KEYS]
  redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
  if redis.call('ZCARD', ck) >= max_conc then
    return {0, 0, math.max(retry, 1000), now, -2, 0, unpack(result)}
  end
end
if retry > 0 then
  return {0, 0, retry, now, 0, 0, unpack(result)}
end

-- Deployment choice: circuit state first (0 open, 1 closed, 2 half-open), then own limits.
local chosen, probe = 0, 0
if D > 0 then
  local state, unhealthy = {}, 0
  for i = C + 1, n do
    local open_until = tonumber(redis.call('HGET', KEYS[base(i) + 4], 'open_until') or '0')
    if open_until == 0 then state[i] = 1
    elseif now < open_until then state[i] = 0; unhealthy = unhealthy + 1
    else state[i] = 2; unhealthy = unhealthy + 1 end
  end
  -- The last deployment is never ejected; below 50% healthy, panic mode uses them all.
  local ignore = (D == 1) or ((D - unhealthy) * 2 < D)
  local best = -1
  for i = C + 1, n do
    if ignore or state[i] ~= 0 then
      local ok, r, stats = check(i)
      if ok and state[i] == 2 and not ignore then
        ok = redis.call('SET', KEYS[base(i) + 5], member, 'NX', 'PX', probe_ms) ~= false
        if ok then probe = 1 end
      end
      if ok then
        chosen = i
        for _, v in ipairs(stats) do table.insert(result, v) end
        break
      end
      if r > 0 and (best < 0 or r < best) then best = r end
    end
  end
  if chosen == 0 then
    -- -3: every candidate is at its own limit; -4: none may serve now (circuit or probe lock)
    if best > 0 then return {0, 0, best, now, -3, 0, unpack(result)} end
    return {0, 0, 1000, now, -4, 0, unpack(result)}
  end
end
for i = 1, C do apply(i) end
if chosen > 0 then apply(chosen) end
if max_conc > 0 then
  local ck = KEYS[#KEYS]
  redis.call('ZADD', ck, now + lease, member)
  redis.call('PEXPIRE', ck, lease + 1000)
end
return {1, chosen > 0 and (chosen - C) or 0, 0, now, 0, probe, unpack(result)}
