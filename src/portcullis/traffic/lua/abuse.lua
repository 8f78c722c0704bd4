-- Count one refusal against a source (GCRA: `threshold` per window, as
-- portcullis.traffic.abuse does in one process) and, when it overflows, earn the source
-- a block shared by every node.
--
-- KEYS[1]: the source's counter (its TAT in microseconds of the server's clock).
-- KEYS[2]: the source's block (a hash: until_ms, length_ms), kept twice its length so
--          a block earned again soon after the last one ended can escalate.
-- ARGV: interval_us, tolerance_us, block_ms, max_block_ms, channel, source.
-- Returns {0} while counting, or {1, length_ms} when this refusal earned a block (then
-- also PUBLISHed to `channel` as "<length_ms> <source>" for the other nodes).

if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])

local raw = redis.call('GET', KEYS[1])
local tat = raw and tonumber(raw) or now_us
if tat < now_us then tat = now_us end
local new_tat = tat + interval
if new_tat - now_us <= tolerance + 0.5 then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now_us) / 1000)))
  return {0}
end

local length = tonumber(ARGV[3])
local prev = redis.call('HMGET', KEYS[2], 'until_ms', 'length_ms')
if prev[1] and prev[2] then
  local until_prev, length_prev = tonumber(prev[1]), tonumber(prev[2])
  if now_ms < until_prev + length_prev then
    -- Blocked again soon after the last block ended (or still in it): escalate.
    length = math.min(tonumber(ARGV[4]), length_prev * 2)
  end
end
redis.call('HSET', KEYS[2], 'until_ms', now_ms + length, 'length_ms', length)
redis.call('PEXPIRE', KEYS[2], 2 * length)
redis.call('PUBLISH', ARGV[5], length .. ' ' .. ARGV[6])
return {1, length}
