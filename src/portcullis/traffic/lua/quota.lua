-- A capped counter for one key and calendar period: count `cost` unless the total
-- would pass `limit`.
--
-- KEYS[1]: the counter (its name holds the period, so a new period is a new key).
-- ARGV: limit, cost, resets_at_ms (epoch milliseconds when the period ends).
-- Returns: allowed (1|0), used (after this request if allowed, else before it).
-- A negative cost gives back what an earlier call counted (another limit refused the
-- same request); the count never goes below zero and the expiry is kept.
--
-- The key expires when the period ends. If that moment is already past by the
-- server's clock (the caller's clock is behind), it is kept a minute longer rather
-- than deleted at once, which would forget every count made near the boundary.

if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local raw = redis.call('GET', KEYS[1])
local used = 0
if raw then used = tonumber(raw) end
if cost < 0 then
  if used == 0 then return {1, 0} end
  used = used + cost
  if used < 0 then used = 0 end
  redis.call('SET', KEYS[1], used, 'KEEPTTL')
  return {1, used}
end
if used + cost > limit then
  return {0, used}
end
used = redis.call('INCRBY', KEYS[1], cost)

local expire_at = tonumber(ARGV[3])
if expire_at < now_ms + 60000 then expire_at = now_ms + 60000 end
redis.call('PEXPIREAT', KEYS[1], expire_at)
return {1, used}
