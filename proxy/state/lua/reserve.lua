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
--          retry_after_ms, now_ms, marker, probe, requests: scope index, rpm, remaining, reset ms,
--          tokens: scope index, tpm, remaining, reset ms, refused scope index, refused dimension,
--          live...}; marker 0 ok/limited, -2
--          concurrency, -3 every candidate at its limit, -4 no candidate may serve now (open
--          circuit / probe in progress). The requests and tokens figures are the most constraining
--          checked scope's (the lowest remaining share of a limit above 0, the first on a tie;
--          scope index 0 when none applies); the checked scopes are the common ones and the chosen
--          candidate. Refused: on a refusal by a limit, the scope whose limit set the retry time
--          (0 when admitted) and which of its limits: 1 requests, 2 tokens. live: {scope index,
--          rpm, tpm} (effective limits) for each checked scope with a live limit set, so the caller
--          can tell a live change without the defaults echoed.
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

-- What the records of one block share (one key offset, one constant tail), parsed once per batch:
-- C, n scopes, max concurrent, lease, probe lock, each scope's first key and default limits.
local plans = {}

local function plan_of(p, len)
  local koff = tonumber(ARGV[p + 1])
  local pl = plans[koff]
  if not pl then
    local C, n = tonumber(ARGV[p + 4]), (len - 8) / 2
    pl = {C = C, n = n, max_conc = tonumber(ARGV[p + 5]), lease = tonumber(ARGV[p + 6]),
          probe_ms = tonumber(ARGV[p + 7]), lims = {}, bases = {}, state = {},
          conc_key = koff + 3 * C + 5 * (n - C) + 1}
    for j = 1, 2 * n do pl.lims[j] = tonumber(ARGV[p + 7 + j]) end
    for i = 1, n do
      if i <= C then pl.bases[i] = koff + 3 * (i - 1) else pl.bases[i] = koff + 3 * C + 5 * (i - C - 1) end
    end
    plans[koff] = pl
  end
  return pl
end

-- Scope i's effective limits: the live ones where set, else the defaults.
local function limits(pl, i)
  local l = live(KEYS[pl.bases[i] + 3])
  return l[1] or pl.lims[2 * i - 1], l[2] or pl.lims[2 * i]
end

-- Check scope i for a request of `tokens`: ok, retry ms and the refusing limit (0 none, 1 requests,
-- 2 tokens: the one that needs the longer wait); its 7 stats are appended to `rows`,
-- and its effective limits to `live_rows` when a live limit is set for it.
local function check(pl, i, tokens, rows, live_rows)
  local b = pl.bases[i]
  local l = live(KEYS[b + 3])
  local rpm, tpm = l[1] or pl.lims[2 * i - 1], l[2] or pl.lims[2 * i]
  if l[1] or l[2] then
    local k = #live_rows
    live_rows[k + 1], live_rows[k + 2], live_rows[k + 3] = i, rpm, tpm
  end
  local ok, retry, dim = true, 0, 0
  local s_rpm, s_rem, s_reset, s_tpm, s_trem, s_treset = -1, -1, 0, -1, -1, 0
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
      dim = 1
    end
    s_rpm, s_rem, s_reset = rpm, math.max(0, rpm - count - 1), reset
  end
  if tpm >= 0 then
    local tat = tat_of(KEYS[b + 2])
    if tat < now then tat = now end
    local new_tat = tat
    if tpm > 0 then new_tat = tat + math.min(tokens, tpm) * WINDOW / tpm end
    if tpm == 0 or new_tat - now > WINDOW then
      ok = false
      local wait = tpm == 0 and WINDOW or math.ceil(new_tat - now - WINDOW)
      if dim == 0 or wait > retry then dim = 2 end
      retry = math.max(retry, wait)
    end
    local used = (tpm > 0) and math.floor((new_tat - now) * tpm / WINDOW) or 0
    s_tpm, s_trem, s_treset = tpm, math.max(0, tpm - used), math.ceil(new_tat - now)
  end
  local k = #rows
  rows[k + 1], rows[k + 2], rows[k + 3], rows[k + 4], rows[k + 5], rows[k + 6], rows[k + 7] =
    i, s_rpm, s_rem, s_reset, s_tpm, s_trem, s_treset
  return ok, retry, dim
end

-- Reserve scope i (checked and admitted): a log entry and the token charge, in memory.
local function apply(pl, i, member, tokens)
  local rpm, tpm = limits(pl, i)
  local b = pl.bases[i]
  if rpm >= 0 then
    local g = log_of(KEYS[b + 1])
    g.added[#g.added + 1] = member
  end
  if tpm > 0 then
    local name = KEYS[b + 2]
    local tat = tats[name]
    if tat < now then tat = now end
    tats[name] = tat + math.min(tokens, tpm) * WINDOW / tpm
    tat_dirty[name] = true
  end
end

-- The reply's tail: the most constraining checked scope per dimension, the refusing limit, then
-- the live rows.
local function finish(out, rows, live_rows, refused, dim)
  local br, bt, br_share, bt_share = 0, 0, 0, 0
  for k = 1, #rows, 7 do
    local rpm, tpm = rows[k + 1], rows[k + 4]
    if rpm > 0 and (br == 0 or rows[k + 2] / rpm < br_share) then br, br_share = k, rows[k + 2] / rpm end
    if tpm > 0 and (bt == 0 or rows[k + 5] / tpm < bt_share) then bt, bt_share = k, rows[k + 5] / tpm end
  end
  if br > 0 then
    out[7], out[8], out[9], out[10] = rows[br], rows[br + 1], rows[br + 2], rows[br + 3]
  else
    out[7], out[8], out[9], out[10] = 0, -1, -1, 0
  end
  if bt > 0 then
    out[11], out[12], out[13], out[14] = rows[bt], rows[bt + 4], rows[bt + 5], rows[bt + 6]
  else
    out[11], out[12], out[13], out[14] = 0, -1, -1, 0
  end
  out[15], out[16] = refused or 0, dim or 0
  for k = 1, #live_rows do out[16 + k] = live_rows[k] end
  return out
end

-- One request: its reply, built in place (no per-request closures or copies).
local function reserve(pl, member, tokens)
  local out = {0, 0, 0, now, 0, 0}
  local rows, live_rows = {}, {}
  local C, n = pl.C, pl.n
  local retry, refused, dim = 0, 0, 0
  for i = 1, C do
    local ok, rr, d = check(pl, i, tokens, rows, live_rows)
    if not ok and (refused == 0 or rr > retry) then refused, dim = i, d end
    if not ok then retry = math.max(retry, rr) end
  end
  local conc = nil
  if pl.max_conc > 0 then
    conc = conc_of(KEYS[pl.conc_key])
    if conc.stored + #conc.added >= pl.max_conc then
      out[3], out[5] = math.max(retry, 1000), -2
      return finish(out, rows, live_rows)
    end
  end
  if retry > 0 then
    out[3] = retry
    return finish(out, rows, live_rows, refused, dim)
  end

  -- Deployment choice: circuit state first (0 open, 1 closed, 2 half-open), then own limits.
  local chosen, probe = 0, 0
  local D = n - C
  if D > 0 then
    local state, unhealthy = pl.state, 0
    for i = C + 1, n do
      local hk = KEYS[pl.bases[i] + 4]
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
    local best, best_i, best_dim = -1, 0, 0
    for i = C + 1, n do
      if ignore or state[i] ~= 0 then
        local mark, live_mark = #rows, #live_rows
        local ok, rr, d = check(pl, i, tokens, rows, live_rows)
        if ok and state[i] == 2 and not ignore then
          ok = redis.call('SET', KEYS[pl.bases[i] + 5], member, 'NX', 'PX', pl.probe_ms) ~= false
          if ok then probe = 1 end
        end
        if ok then
          chosen = i
          break
        end
        -- only the chosen candidate is reported
        for k = #rows, mark + 1, -1 do rows[k] = nil end
        for k = #live_rows, live_mark + 1, -1 do live_rows[k] = nil end
        if rr > 0 and (best < 0 or rr < best) then best, best_i, best_dim = rr, i, d end
      end
    end
    if chosen == 0 then
      -- -3: every candidate is at its own limit; -4: none may serve now (circuit or probe lock)
      if best > 0 then out[3], out[5] = best, -3 else out[3], out[5] = 1000, -4 end
      return finish(out, rows, live_rows, best_i, best_dim)
    end
  end
  for i = 1, C do apply(pl, i, member, tokens) end
  if chosen > 0 then apply(pl, chosen, member, tokens) end
  if conc then
    conc.added[#conc.added + 1] = member
    conc.added[#conc.added + 1] = now + pl.lease
    conc.lease = math.max(conc.lease, pl.lease)
  end
  out[1], out[2], out[6] = 1, chosen > 0 and (chosen - C) or 0, probe
  return finish(out, rows, live_rows)
end

local replies = {}
local p, nargs = 1, #ARGV
while p <= nargs do
  local len = tonumber(ARGV[p])
  replies[#replies + 1] = reserve(plan_of(p, len), ARGV[p + 2], tonumber(ARGV[p + 3]))
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
