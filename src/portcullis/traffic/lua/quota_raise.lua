-- Raise an existing quota counter to at least ARGV[1], keeping its expiry; a missing
-- counter stays missing (its period ended). Returns the counter after the call (0 if
-- missing). Used once after a counter was restored from a node's own, older view, when
-- the durable ledger (portcullis.traffic.ledger) knew a higher count.
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local used = tonumber(raw)
local floor = tonumber(ARGV[1])
if used < floor then
  redis.call('SET', KEYS[1], floor, 'KEEPTTL')
  return floor
end
return used
