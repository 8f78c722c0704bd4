-- wrk script: one client-credentials token request per call (RFC 6749 §4.4),
-- client_secret_basic. Settings come from the environment (scripts/bench/oauth_bench.sh):
--   BENCH_CLIENT_ID, BENCH_CLIENT_SECRET   the confidential client
--   BENCH_TOKEN_PATH                        default /oauth2/token
--   BENCH_TOKEN_BODY                        default grant_type=client_credentials&scope=api%3Aread
-- Every response is checked: a non-200 or a body without access_token is counted and
-- the first few are printed, so a failing server cannot pass for a fast one.
local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_common.lua")

local id = os.getenv("BENCH_CLIENT_ID") or "bench-client"
local secret = os.getenv("BENCH_CLIENT_SECRET") or "bench-secret-not-for-production"
wrk.method = "POST"
wrk.path = os.getenv("BENCH_TOKEN_PATH") or "/oauth2/token"
wrk.body = os.getenv("BENCH_TOKEN_BODY") or "grant_type=client_credentials&scope=api%3Aread"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Accept"] = "application/json"
wrk.headers["Authorization"] = common.basic(id, secret)

common.check("token", "token", function(status, body)
  return not (status ~= 200 or not body:find('"access_token"', 1, true))
end)
