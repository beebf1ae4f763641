-- Settle a reservation with the real usage, once per reservation (idempotent).
-- KEYS: 1 = done marker, 2 = concurrency ZSET (or the marker again when unused),
--       then per scope: token TAT key, live limit HASH.
-- ARGV: 1 member, 2 token delta (real - estimated; may be negative; 0 = the reservation stands),
--       then per scope: default tpm; then (optional, last) the estimated tokens.
-- reserve.lua charged each scope min(estimate, tpm): given the estimate, a scope is settled
-- against that charge, so a max_tokens above the whole budget cannot refund other requests' tokens.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', 600000) == false then
  return 0
end
if KEYS[2] ~= KEYS[1] then redis.call('ZREM', KEYS[2], ARGV[1]) end
local delta = tonumber(ARGV[2])
local n = (#KEYS - 2) / 2
local estimate = tonumber(ARGV[3 + n])
for i = 1, n do
  local tpm = tonumber(ARGV[2 + i])
  local live = redis.call('HGET', KEYS[2 + 2 * i], 'tokens_per_minute')
  if live then tpm = tonumber(live) or tpm end
  if tpm and tpm > 0 and delta ~= 0 then
    local key = KEYS[1 + 2 * i]
    local tat = tonumber(redis.call('GET', key) or '0')
    local charge = delta
    if estimate then charge = delta + estimate - math.min(estimate, tpm) end
    tat = tat + charge * 60000 / tpm
    if tat > now then
      redis.call('SET', key, tostring(tat), 'PX', math.ceil(tat - now) + 60000)
    else
      redis.call('DEL', key)
    end
  end
end
return 1
