-- Settle a batch of reservations with their real usage, each once (idempotent per reservation).
-- Per key, token TAT and live limit are read at most once and written at most once per batch.
--
-- ARGV: one record per settlement, back to back. A record: its length (this field included), its
--       number of KEYS k, member, token delta (real - estimated; may be negative; 0 = the
--       reservation stands), then per scope: default tpm; then the estimated tokens.
-- KEYS: each record's k keys, in record order: 1 = done marker, 2 = concurrency ZSET (or the
--       marker again when unused), then per scope: token TAT key, live limit HASH.
-- reserve.lua charged each scope min(estimate, tpm): given the estimate, a scope is settled
-- against that charge, so a max_tokens above the whole budget cannot refund other requests' tokens.
-- Returns one result per record: 1 settled now, 0 already settled before.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tats, dirty, lives = {}, {}, {}

local function settle(k, p, len)
  if redis.call('SET', KEYS[k], '1', 'NX', 'PX', 600000) == false then
    return 0
  end
  if KEYS[k + 1] ~= KEYS[k] then redis.call('ZREM', KEYS[k + 1], ARGV[p + 2]) end
  local delta = tonumber(ARGV[p + 3])
  if delta == 0 then return 1 end
  local n = len - 5  -- scopes: the record minus length, k, member, delta and the estimate
  local estimate = tonumber(ARGV[p + len - 1])
  for i = 1, n do
    local tpm = tonumber(ARGV[p + 3 + i])
    local lk = KEYS[k + 1 + 2 * i]
    local live = lives[lk]
    if live == nil then
      live = tonumber(redis.call('HGET', lk, 'tokens_per_minute')) or false
      lives[lk] = live
    end
    if live then tpm = live end
    if tpm and tpm > 0 then
      local key = KEYS[k + 2 * i]
      local tat = tats[key]
      if tat == nil then tat = tonumber(redis.call('GET', key) or '0') end
      tats[key] = tat + (delta + estimate - math.min(estimate, tpm)) * 60000 / tpm
      dirty[key] = true
    end
  end
  return 1
end

local results = {}
local p, k = 1, 1
while p <= #ARGV do
  local len = tonumber(ARGV[p])
  results[#results + 1] = settle(k, p, len)
  k = k + tonumber(ARGV[p + 1])
  p = p + len
end
for key in pairs(dirty) do
  local tat = tats[key]
  if tat > now then
    redis.call('SET', key, tostring(tat), 'PX', math.ceil(tat - now) + 60000)
  else
    redis.call('DEL', key)
  end
end
return results
