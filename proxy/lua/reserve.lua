-- Atomic multi-scope admission: all or nothing, Redis TIME as the only clock.
--
-- KEYS: for each scope i (1..n): 3i-2 = request log (ZSET), 3i-1 = token TAT (string),
--       3i = live limit override (HASH requests_per_minute / tokens_per_minute).
--       Then, if ARGV[4] > 0, one concurrency ZSET.
-- ARGV: 1 member (unique per reservation), 2 estimated tokens, 3 n_common (scopes that must all
--       pass), 4 max_concurrent (0 = none), 5 concurrency lease ms,
--       then per scope: default rpm, default tpm (-1 = unlimited).
-- Scopes after the first n_common are deployment candidates: the first one that passes is taken.
-- Returns {admitted, chosen (1-based candidate index or 0), retry_after_ms, now_ms, flat stats}
-- where stats per applied scope = {scope index, rpm limit, rpm remaining, rpm reset ms,
-- tpm limit, tpm remaining, tpm reset ms}.
local WINDOW = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local tokens = tonumber(ARGV[2])
local n_common = tonumber(ARGV[3])
local max_conc = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
local n = (#ARGV - 5) / 2

local function limits(i)
  local rpm = tonumber(ARGV[4 + 2 * i])
  local tpm = tonumber(ARGV[5 + 2 * i])
  local live = redis.call('HMGET', KEYS[3 * i], 'requests_per_minute', 'tokens_per_minute')
  if live[1] then rpm = tonumber(live[1]) or rpm end
  if live[2] then tpm = tonumber(live[2]) or tpm end
  return rpm, tpm
end

-- returns ok, retry_ms, stats
local function check(i)
  local rpm, tpm = limits(i)
  local ok, retry = true, 0
  local stats = {i, -1, -1, 0, -1, -1, 0}
  if rpm and rpm >= 0 then
    local log = KEYS[3 * i - 2]
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
    local tat = tonumber(redis.call('GET', KEYS[3 * i - 1]) or '0')
    if tat < now then tat = now end
    local want = math.min(tokens, tpm)
    local new_tat = tat
    if tpm > 0 then new_tat = tat + want * WINDOW / tpm end
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
  local rpm, tpm = limits(i)
  if rpm and rpm >= 0 then
    redis.call('ZADD', KEYS[3 * i - 2], now, member)
    redis.call('PEXPIRE', KEYS[3 * i - 2], WINDOW + 1000)
  end
  if tpm and tpm > 0 then
    local key = KEYS[3 * i - 1]
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    tat = tat + math.min(tokens, tpm) * WINDOW / tpm
    redis.call('SET', key, tostring(tat), 'PX', math.ceil(tat - now) + WINDOW)
  end
end

local result = {}
local retry = 0
for i = 1, n_common do
  local ok, r, stats = check(i)
  for _, v in ipairs(stats) do table.insert(result, v) end
  if not ok then retry = math.max(retry, r) end
end
if max_conc > 0 then
  local ck = KEYS[3 * n + 1]
  redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
  if redis.call('ZCARD', ck) >= max_conc then
    return {0, 0, math.max(retry, 1000), now, -2}
  end
end
if retry > 0 then
  return {0, 0, retry, now, unpack(result)}
end
local chosen = 0
if n > n_common then
  local best = -1
  for i = n_common + 1, n do
    local ok, r, stats = check(i)
    if ok then
      chosen = i
      for _, v in ipairs(stats) do table.insert(result, v) end
      break
    end
    if best < 0 or r < best then best = r end
  end
  if chosen == 0 then
    return {0, 0, best, now, -3, unpack(result)}
  end
end
for i = 1, n_common do apply(i) end
if chosen > 0 then apply(chosen) end
if max_conc > 0 then
  local ck = KEYS[3 * n + 1]
  redis.call('ZADD', ck, now + lease, member)
  redis.call('PEXPIRE', ck, lease + 1000)
end
return {1, chosen > 0 and (chosen - n_common) or 0, 0, now, unpack(result)}
