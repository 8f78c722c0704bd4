-- wrk script: one token introspection per call (RFC 7662 §2.1), the caller authenticated
-- with client_secret_basic. Settings come from the environment (scripts/bench/oauth_bench.sh):
--   BENCH_CLIENT_ID, BENCH_CLIENT_SECRET   the confidential client (the token's own client)
--   BENCH_TOKEN                             the access token to introspect, obtained first
--   BENCH_INTROSPECT_PATH                   default /oauth2/introspect
-- A response that is not 200 with "active":true is counted and the first few printed:
-- an inactive answer is cheap and must not pass for a fast introspection.
local function b64(data)
  local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  return ((data:gsub(".", function(x)
    local r, byte = "", x:byte()
    for i = 8, 1, -1 do r = r .. (byte % 2 ^ i - byte % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#data % 3 + 1])
end

-- RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding.
local function formenc(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

local id = os.getenv("BENCH_CLIENT_ID") or "bench-client"
local secret = os.getenv("BENCH_CLIENT_SECRET") or "bench-secret-not-for-production"
local token = os.getenv("BENCH_TOKEN")
if not token or token == "" then error("BENCH_TOKEN is not set") end
wrk.method = "POST"
wrk.path = os.getenv("BENCH_INTROSPECT_PATH") or "/oauth2/introspect"
wrk.body = "token=" .. formenc(token) .. "&token_type_hint=access_token"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Accept"] = "application/json"
wrk.headers["Authorization"] = "Basic " .. b64(formenc(id) .. ":" .. formenc(secret))

-- Responses are checked in each wrk thread; done() adds the threads' counts up.
local threads = {}
setup = function(thread) threads[#threads + 1] = thread end

bad, shown = 0, 0
response = function(status, headers, body)
  if status ~= 200 or not body:find('"active":%s*true') then
    bad = bad + 1
    if shown < 3 then
      shown = shown + 1
      io.stderr:write("introspection: unexpected response " .. status .. ": " .. body:sub(1, 200) .. "\n")
    end
  end
end

done = function(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + (t:get("bad") or 0) end
  io.write(string.format("bad introspection responses: %d\n", total))
end
