-- A capped counter for one key and calendar period: count `cost` unless the total
-- would pass `limit`.
--
-- KEYS[1]: the counter (its name holds the period, so a new period is a new key).
-- ARGV: limit, cost, resets_at_ms (epoch milliseconds when the period ends), seed.
-- Returns: allowed (1|0), used (after this request if allowed, else before it),
-- restored (1 if the counter did not exist and started from a seed > 0, else 0).
-- A negative cost gives back what an earlier call counted (another limit refused the
-- same request); the count never goes below zero and the expiry is kept.
--
-- `seed` (>= 0, optional) is where a counter that does not exist starts: the count the
-- caller last saw or the durable ledger holds (portcullis.traffic.ledger), so a counter
-- Redis lost (restart, eviction) resumes instead of starting from zero. An existing
-- counter ignores it.
--
-- The key expires when the period ends. If that moment is already past by the
-- server's clock (the caller's clock is behind), it is kept a minute longer rather
-- than deleted at once, which would forget every count made near the boundary.

if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local expire_at = tonumber(ARGV[3])
if expire_at < now_ms + 60000 then expire_at = now_ms + 60000 end
local seed = tonumber(ARGV[4] or '0')
local raw = redis.call('GET', KEYS[1])
local used = 0
local restored = 0
if raw then
  used = tonumber(raw)
elseif seed > 0 then
  used = seed
  restored = 1
  redis.call('SET', KEYS[1], used, 'PXAT', expire_at)
end
if cost < 0 then
  if used == 0 then return {1, 0, restored} end
  used = used + cost
  if used < 0 then used = 0 end
  redis.call('SET', KEYS[1], used, 'KEEPTTL')
  return {1, used, restored}
end
if used + cost > limit then
  return {0, used, restored}
end
used = redis.call('INCRBY', KEYS[1], cost)
redis.call('PEXPIREAT', KEYS[1], expire_at)
return {1, used, restored}
