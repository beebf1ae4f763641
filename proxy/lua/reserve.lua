-- Atomic admission for a batch of requests, taken one after the other: for each, rate limits in
-- every scope, plus the choice of a deployment that is within its own limits and whose shared
-- circuit breaker lets it serve. Each request is all or nothing and sees the reservations of the
-- requests before it; Redis TIME is the only clock. Per key, the state is read at most once and
-- written at most once per batch (trim, count, live limits, token TAT, health, expiry): that, not
-- the per-request work, is what a call costs, so a batch of N costs far less than N calls.
--
-- ARGV: one record per request, back to back. A record: its length (this field included), koff,
--       member (unique per reservation), estimated tokens, C, max concurrent (0 = none),
--       concurrency lease ms, probe lock ms, then per scope (common first): default rpm, default
--       tpm (-1 = unlimited).
-- KEYS (from koff, the record's offset into KEYS; records of the same plan share their keys):
--       common scope i (1..C): 3 keys at 3(i-1): request log ZSET, token TAT, live-limit HASH.
--       candidate j (1..D): 5 keys at 3C+5(j-1): request log, token TAT, live-limit HASH,
--       health HASH, probe lock. Then, when max concurrent > 0, one concurrency ZSET.
-- Returns one reply per record, in order: {admitted, chosen candidate (1-based, 0 = none),
--          retry_after_ms, now_ms, marker, probe, stats...}; marker 0 ok/limited, -2 concurrency,
--          -3 every candidate at its limit, -4 no candidate may serve now (open circuit / probe
--          in progress); stats per checked scope = {scope index, rpm, rpm remaining, rpm reset
--          ms, tpm, tpm remaining, tpm reset ms}.
local WINDOW = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Per key name (a key may appear in several plans' blocks): read once, changed in memory.
local logs, tats, tat_dirty, lives, opens, concs = {}, {}, {}, {}, {}, {}

local function live(name)
  local l = lives[name]
  if not l then
    local v = redis.call('HMGET', name, 'requests_per_minute', 'tokens_per_minute')
    l = {tonumber(v[1]) or false, tonumber(v[2]) or false}
    lives[name] = l
  end
  return l
end

local function log_of(name)
  local g = logs[name]
  if not g then
    redis.call('ZREMRANGEBYSCORE', name, '-inf', now - WINDOW)
    local count = redis.call('ZCARD', name)
    local oldest = false
    if count > 0 then oldest = tonumber(redis.call('ZRANGE', name, 0, 0, 'WITHSCORES')[2]) end
    g = {stored = count, oldest = oldest, added = {}}
    logs[name] = g
  end
  return g
end

local function tat_of(name)
  local tat = tats[name]
  if tat == nil then
    tat = tonumber(redis.call('GET', name) or '0')
    tats[name] = tat
  end
  return tat
end

local function conc_of(name)
  local g = concs[name]
  if not g then
    redis.call('ZREMRANGEBYSCORE', name, '-inf', now)
    g = {stored = redis.call('ZCARD', name), added = {}, lease = 0}
    concs[name] = g
  end
  return g
end

-- One request. r: koff, member, tokens, C, max_conc, lease, probe_ms, p (its first limit arg), n.
local function reserve(r)
  local C, n = r.C, r.n
  local function base(i)
    if i <= C then return r.koff + 3 * (i - 1) end
    return r.koff + 3 * C + 5 * (i - C - 1)
  end
  local seen = {}

  local function check(i)
    local b = base(i)
    local rpm = tonumber(ARGV[r.p + 2 * (i - 1)])
    local tpm = tonumber(ARGV[r.p + 2 * i - 1])
    local l = live(KEYS[b + 3])
    if l[1] then rpm = l[1] end
    if l[2] then tpm = l[2] end
    seen[i] = {rpm, tpm}
    local ok, retry = true, 0
    local stats = {i, -1, -1, 0, -1, -1, 0}
    if rpm >= 0 then
      local g = log_of(KEYS[b + 1])
      local count = g.stored + #g.added
      local reset = WINDOW
      if count > 0 then reset = (g.oldest or now) + WINDOW - now end
      if count >= rpm then
        ok = false
        if rpm == 0 then
          retry = WINDOW
        else  -- the entry whose leaving frees a slot: stored, or one of this batch's (at now)
          local idx = count - rpm
          local at = now
          if idx < g.stored then
            at = tonumber(redis.call('ZRANGE', KEYS[b + 1], idx, idx, 'WITHSCORES')[2])
          end
          retry = math.max(retry, at + WINDOW - now)
        end
      end
      stats[2], stats[3], stats[4] = rpm, math.max(0, rpm - count - 1), reset
    end
    if tpm >= 0 then
      local tat = tat_of(KEYS[b + 2])
      if tat < now then tat = now end
      local new_tat = tat
      if tpm > 0 then new_tat = tat + math.min(r.tokens, tpm) * WINDOW / tpm end
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
    local rpm, tpm = seen[i][1], seen[i][2]
    local b = base(i)
    if rpm >= 0 then
      local g = log_of(KEYS[b + 1])
      g.added[#g.added + 1] = r.member
    end
    if tpm > 0 then
      local name = KEYS[b + 2]
      local tat = tats[name]
      if tat < now then tat = now end
      tats[name] = tat + math.min(r.tokens, tpm) * WINDOW / tpm
      tat_dirty[name] = true
    end
  end

  local result = {}
  local retry = 0
  for i = 1, C do
    local ok, rr, stats = check(i)
    for _, v in ipairs(stats) do result[#result + 1] = v end
    if not ok then retry = math.max(retry, rr) end
  end
  local conc = nil
  if r.max_conc > 0 then
    conc = conc_of(KEYS[base(n + 1) + 1])
    if conc.stored + #conc.added >= r.max_conc then
      return {0, 0, math.max(retry, 1000), now, -2, 0, unpack(result)}
    end
  end
  if retry > 0 then
    return {0, 0, retry, now, 0, 0, unpack(result)}
  end

  -- Deployment choice: circuit state first (0 open, 1 closed, 2 half-open), then own limits.
  local chosen, probe = 0, 0
  local D = n - C
  if D > 0 then
    local state, unhealthy = {}, 0
    for i = C + 1, n do
      local hk = KEYS[base(i) + 4]
      local open_until = opens[hk]
      if open_until == nil then
        open_until = tonumber(redis.call('HGET', hk, 'open_until') or '0')
        opens[hk] = open_until
      end
      if open_until == 0 then state[i] = 1
      elseif now < open_until then state[i] = 0; unhealthy = unhealthy + 1
      else state[i] = 2; unhealthy = unhealthy + 1 end
    end
    -- The last deployment is never ejected; below 50% healthy, panic mode uses them all.
    local ignore = (D == 1) or ((D - unhealthy) * 2 < D)
    local best = -1
    for i = C + 1, n do
      if ignore or state[i] ~= 0 then
        local ok, rr, stats = check(i)
        if ok and state[i] == 2 and not ignore then
          ok = redis.call('SET', KEYS[base(i) + 5], r.member, 'NX', 'PX', r.probe_ms) ~= false
          if ok then probe = 1 end
        end
        if ok then
          chosen = i
          for _, v in ipairs(stats) do result[#result + 1] = v end
          break
        end
        if rr > 0 and (best < 0 or rr < best) then best = rr end
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
  if conc then
    conc.added[#conc.added + 1] = r.member
    conc.added[#conc.added + 1] = now + r.lease
    conc.lease = math.max(conc.lease, r.lease)
  end
  return {1, chosen > 0 and (chosen - C) or 0, 0, now, 0, probe, unpack(result)}
end

local replies = {}
local p = 1
while p <= #ARGV do
  local len = tonumber(ARGV[p])
  local r = {koff = tonumber(ARGV[p + 1]), member = ARGV[p + 2], tokens = tonumber(ARGV[p + 3]),
             C = tonumber(ARGV[p + 4]), max_conc = tonumber(ARGV[p + 5]), lease = tonumber(ARGV[p + 6]),
             probe_ms = tonumber(ARGV[p + 7]), p = p + 8, n = (len - 8) / 2}
  replies[#replies + 1] = reserve(r)
  p = p + len
end

-- Write back once per key: this batch's log entries, token TATs, concurrency leases.
for name, g in pairs(logs) do
  if #g.added > 0 then
    local args = {}
    for _, m in ipairs(g.added) do
      args[#args + 1] = now
      args[#args + 1] = m
    end
    redis.call('ZADD', name, unpack(args))
    redis.call('PEXPIRE', name, WINDOW + 1000)
  end
end
for name in pairs(tat_dirty) do
  local tat = tats[name]
  redis.call('SET', name, tostring(tat), 'PX', math.ceil(tat - now) + WINDOW)
end
for name, g in pairs(concs) do
  if #g.added > 0 then
    local args = {}
    for k = 1, #g.added, 2 do
      args[#args + 1] = g.added[k + 1]
      args[#args + 1] = g.added[k]
    end
    redis.call('ZADD', name, unpack(args))
    redis.call('PEXPIRE', name, g.lease + 1000)
  end
end
return replies
