-- wrk script: one forward-auth decision per call on Portcullis's decision listener, nginx
-- convention (GET /nginx with X-Original-Method/-URI; the caller's address in X-Real-IP),
-- for a project read: GET /v1/tenants/acme/projects/p<N> with an API key. Settings come
-- from the environment (scripts/bench/policy_bench.sh):
--   BENCH_KEYS   space-separated API keys, used in turn (one principal each)
--   BENCH_IDS    how many project ids to draw from at random (1: always p1, the same
--                request again and again; large: almost every decision is new)
--   BENCH_IP     X-Real-IP (default 10.1.2.3, inside the example's office network)
-- An answer other than 200 is counted and the first few printed: every request here
-- should be allowed, and a fast denial must not pass for a fast decision.
local keys = {}
for k in (os.getenv("BENCH_KEYS") or ""):gmatch("%S+") do keys[#keys + 1] = k end
if #keys == 0 then error("BENCH_KEYS is not set") end
local ids = tonumber(os.getenv("BENCH_IDS") or "1")
local ip = os.getenv("BENCH_IP") or "10.1.2.3"
local n = 0

local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_common.lua")
local threads = common.check("forward-auth", "decision", function(status, body)
  return not (status ~= 200)
end)

init = function(args)
  math.randomseed(os.time() + #threads)
end

request = function()
  n = n + 1
  local id = ids > 1 and math.random(1, ids) or 1
  return wrk.format("GET", "/nginx", {
    ["X-Original-Method"] = "GET",
    ["X-Original-URI"] = "/v1/tenants/acme/projects/p" .. id,
    ["X-Real-IP"] = ip,
    ["X-API-Key"] = keys[(n % #keys) + 1],
  })
end

