-- wrk script: one client-credentials token request per call (RFC 6749 §4.4),
-- client_secret_basic. Settings come from the environment (scripts/bench/oauth_bench.sh):
--   BENCH_CLIENT_ID, BENCH_CLIENT_SECRET   the confidential client
--   BENCH_TOKEN_PATH                        default /oauth2/token
--   BENCH_TOKEN_BODY                        default grant_type=client_credentials&scope=api%3Aread
-- Every response is checked: a non-200 or a body without access_token is counted and
-- the first few are printed, so a failing server cannot pass for a fast one.
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
wrk.method = "POST"
wrk.path = os.getenv("BENCH_TOKEN_PATH") or "/oauth2/token"
wrk.body = os.getenv("BENCH_TOKEN_BODY") or "grant_type=client_credentials&scope=api%3Aread"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Accept"] = "application/json"
wrk.headers["Authorization"] = "Basic " .. b64(formenc(id) .. ":" .. formenc(secret))

-- Responses are checked in each wrk thread; done() adds the threads' counts up.
local threads = {}
setup = function(thread) threads[#threads + 1] = thread end

bad, shown = 0, 0
response = function(status, headers, body)
  if status ~= 200 or not body:find('"access_token"', 1, true) then
    bad = bad + 1
    if shown < 3 then
      shown = shown + 1
      io.stderr:write("token: unexpected response " .. status .. ": " .. body:sub(1, 200) .. "\n")
    end
  end
end

done = function(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + (t:get("bad") or 0) end
  io.write(string.format("bad token responses: %d\n", total))
end
