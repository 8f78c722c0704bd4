-- GCRA over every key of one or more requests, each request all or nothing.
--
-- Callers batch the requests that arrive together into one call (one round trip);
-- the requests are decided one after another, exactly as if each had its own call.
--
-- KEYS: the keys of request 1's checks, then of request 2's, ...
-- ARGV[1]: numbers separated by single spaces (one argument, so a batch costs the
--          client one argument to encode, not four per check):
--          the number of requests; then per request: n, its number of checks; then
--          per check: interval_us (per_seconds / requests, in microseconds),
--          tolerance_us (interval_us * burst), cost.
-- Returns, per check in order: allowed (1|0), remaining, reset_after_us, retry_after_us.
--
-- State: one value per key, the theoretical arrival time (TAT) in microseconds of the
-- server's clock, kept only until the bucket is full again (PX): a missing key and a
-- TAT in the past mean the same thing. Time is the server's TIME, so every node agrees.

-- Non-deterministic TIME before a write needs effects replication; Redis >= 5 does that
-- by default, older servers are told so.
if redis.replicate_commands then redis.replicate_commands() end

-- Locals: global lookups are table lookups in Lua, and this runs per check.
local floor, ceil, tonumber, call, format = math.floor, math.ceil, tonumber, redis.call, string.format
local keys = KEYS

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- Half a microsecond of slack keeps a request arriving exactly on schedule admitted
-- despite float rounding of the stored TAT.
local EPS = 0.5

local nums = {}
for word in string.gmatch(ARGV[1], '%S+') do nums[#nums + 1] = tonumber(word) end

-- Every key read once (one MGET), every changed key written once at the end: the
-- script is atomic, so this is the same as reading and writing request by request.
local stored = call('MGET', unpack(keys))
local tats = {}     -- key -> TAT as left by the requests decided so far
local dirty = {}    -- keys to write, in first-change order
local changed = {}

local out = {}
local no = 0
-- Checks admitted so far in the current request, staged until it is all admitted:
-- parallel arrays reused across requests (requests have a handful of checks, so a
-- linear scan beats allocating a table per request).
local sk = {}
local st = {}
local ki = 1
local ai = 2
for _ = 1, nums[1] do
  local n = nums[ai]
  ai = ai + 1
  local m = 0
  local ok = true
  for _ = 1, n do
    local key = keys[ki]
    local interval = nums[ai]
    local tolerance = nums[ai + 1]
    local cost = nums[ai + 2]
    -- A key named twice in one request sees its own earlier check.
    local tat = nil
    local slot = 0
    for j = 1, m do
      if sk[j] == key then tat = st[j]; slot = j end
    end
    if tat == nil then
      tat = tats[key]
      if tat == nil then
        local raw = stored[ki]
        tat = raw and tonumber(raw) or now
        tats[key] = tat
      end
    end
    ki = ki + 1
    ai = ai + 3
    if tat < now then tat = now end
    local new_tat = tat + interval * cost
    if new_tat - now > tolerance + EPS then
      ok = false
      local remaining = floor((tolerance - (tat - now)) / interval)
      if remaining < 0 then remaining = 0 end
      out[no + 1] = 0
      out[no + 2] = remaining
      out[no + 3] = ceil(tat - now)
      out[no + 4] = ceil(new_tat - now - tolerance)
    else
      if slot == 0 then
        m = m + 1
        sk[m] = key
        st[m] = new_tat
      else
        st[slot] = new_tat
      end
      local remaining = floor((tolerance - (new_tat - now)) / interval + 1e-9)
      if remaining < 0 then remaining = 0 end
      out[no + 1] = 1
      out[no + 2] = remaining
      out[no + 3] = ceil(new_tat - now)
      out[no + 4] = 0
    end
    no = no + 4
  end
  -- All or nothing: state advances only when every check of the request admitted it.
  if ok then
    for j = 1, m do
      local key = sk[j]
      tats[key] = st[j]
      if not changed[key] then
        changed[key] = true
        dirty[#dirty + 1] = key
      end
    end
  end
end

for _, key in ipairs(dirty) do
  local tat = tats[key]
  local ttl = ceil((tat - now) / 1000)
  if ttl < 1 then ttl = 1 end
  call('SET', key, format('%.17g', tat), 'PX', ttl)
end
return out
