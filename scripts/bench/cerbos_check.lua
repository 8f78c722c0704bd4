-- wrk script: one Cerbos decision per call, POST /api/check/resources: may this principal
-- `read` project p<N> of tenant acme? The principals and attributes are those Portcullis
-- builds for the same requests (scripts/bench/cerbos/policies/project.yaml explains the
-- mapping). Settings come from the environment (scripts/bench/policy_bench.sh):
--   BENCH_PRINCIPALS  how many of the four principals to use in turn (viewer, editor,
--                     admin, billing; default 4)
--   BENCH_IDS         how many project ids to draw from at random (1: always p1)
-- An answer that is not 200 with the action allowed is counted and the first few printed.
local roster = {
  {id = "acme/key:vera", role = "viewer", clearance = 1},
  {id = "acme/key:eddie", role = "editor", clearance = 2},
  {id = "acme/key:ann", role = "admin", clearance = 3},
  {id = "acme/key:bill", role = "billing", clearance = 2},
}
local count = tonumber(os.getenv("BENCH_PRINCIPALS") or "4")
local ids = tonumber(os.getenv("BENCH_IDS") or "1")
local n = 0

local bodies = {}
local function body(p, id)
  local subject = p.id:sub(6)
  return string.format(
    '{"requestId":"b","principal":{"id":"%s","roles":["%s"],"attr":{"subject":"%s","tenant":"acme",' ..
    '"clearance":%d,"networks":["office"],"mfa":false,"high_risk":false}},' ..
    '"resources":[{"resource":{"kind":"project","id":"p%d","attr":{"tenant":"acme","path_tenant":"acme",' ..
    '"owned":true,"sensitivity":1}},"actions":["read"]}]}', p.id, p.role, subject, p.clearance, id)
end

local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_common.lua")
local threads = common.check("cerbos", "decision", function(status, body)
  return not (status ~= 200 or not body:find('"read":"EFFECT_ALLOW"', 1, true))
end)

init = function(args)
  math.randomseed(os.time() + #threads)
end

local headers = {["Content-Type"] = "application/json"}
request = function()
  n = n + 1
  local id = ids > 1 and math.random(1, ids) or 1
  local p = roster[(n % count) + 1]
  return wrk.format("POST", "/api/check/resources", headers, body(p, id))
end

