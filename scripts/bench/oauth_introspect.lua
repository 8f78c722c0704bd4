-- wrk script: one token introspection per call (RFC 7662 §2.1), the caller authenticated
-- with client_secret_basic. Settings come from the environment (scripts/bench/oauth_bench.sh):
--   BENCH_CLIENT_ID, BENCH_CLIENT_SECRET   the confidential client (the token's own client)
--   BENCH_TOKEN                             the access token to introspect, obtained first
--   BENCH_INTROSPECT_PATH                   default /oauth2/introspect
-- A response that is not 200 with "active":true is counted and the first few printed:
-- an inactive answer is cheap and must not pass for a fast introspection.
local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_common.lua")

local id = os.getenv("BENCH_CLIENT_ID") or "bench-client"
local secret = os.getenv("BENCH_CLIENT_SECRET") or "bench-secret-not-for-production"
local token = os.getenv("BENCH_TOKEN")
if not token or token == "" then error("BENCH_TOKEN is not set") end
wrk.method = "POST"
wrk.path = os.getenv("BENCH_INTROSPECT_PATH") or "/oauth2/introspect"
wrk.body = "token=" .. common.formenc(token) .. "&token_type_hint=access_token"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Accept"] = "application/json"
wrk.headers["Authorization"] = common.basic(id, secret)

common.check("introspection", "introspection", function(status, body)
  return not (status ~= 200 or not body:find('"active":%s*true'))
end)
