-- Shared by the benchmark's wrk scripts: HTTP Basic client credentials (RFC 6749 §2.3.1)
-- and response checking, so a failing server cannot pass for a fast one. Load it with
--   local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_common.lua")
local M = {}

function M.b64(data)
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
function M.formenc(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

function M.basic(id, secret)
  return "Basic " .. M.b64(M.formenc(id) .. ":" .. M.formenc(secret))
end

-- Installs wrk's setup/response/done: a response for which ok(status, body) is false is
-- counted in its thread (the first three printed, prefixed with `label`); done() adds the
-- threads' counts up and prints "bad <what> responses: N". Returns the threads table.
function M.check(label, what, ok)
  local threads = {}
  setup = function(thread) threads[#threads + 1] = thread end
  bad, shown = 0, 0
  response = function(status, headers, body)
    if not ok(status, body) then
      bad = bad + 1
      if shown < 3 then
        shown = shown + 1
        io.stderr:write(label .. ": unexpected response " .. status .. ": " .. body:sub(1, 200) .. "\n")
      end
    end
  end
  done = function(summary, latency, requests)
    local total = 0
    for _, t in ipairs(threads) do total = total + (t:get("bad") or 0) end
    io.write(string.format("bad %s responses: %d\n", what, total))
  end
  return threads
end

return M
