-- A fixed offered rate for `python -m perf ratelimit` (wrk 4 has no rate
-- option): every request claims the next slot of this thread's schedule, RATE
-- per second, so the rate holds whatever the latency as long as a connection
-- is free at each slot. Answers are counted per status and per second of
-- CLOCK_MONOTONIC, which every process on the machine shares, so the harness
-- can add up the seconds of several wrk processes.
--
--   wrk -t1 -c8 -d20s -s ratelimit_paced.lua URL -- RATE
--
-- The API key, if any, comes from MLSERVE_API_KEY (not the command line,
-- which any process can read).
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } perf_timespec;
int clock_gettime(int clock_id, perf_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local now = ffi.new("perf_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now)
  return tonumber(now.tv_sec) * 1000 + tonumber(now.tv_nsec) / 1e6
end

common.post_json('{"model_name":"iris_classifier","features":[5.1,3.5,1.4,0.2],"use_cache":false}')
local key = os.getenv("MLSERVE_API_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  interval = 1000 / tonumber(args[1])
  next_slot = nil
  -- {second * 1000 + status = answers}: flat, as wrk's thread:get copies
  -- nested tables wrongly (wrk 4.1 crashes on them)
  counts = {}
end

function delay()
  local t = now_ms()
  -- Slots missed by more than 100 ms (no connection was free) are dropped,
  -- not sent in a burst: the harness reports the rate actually offered.
  if next_slot == nil or next_slot < t - 100 then
    next_slot = t
  end
  local slot = next_slot
  next_slot = slot + interval
  return math.max(0, math.floor(slot - t))
end

function response(status, headers, body)
  local at = math.floor(now_ms() / 1000) * 1000 + status
  counts[at] = (counts[at] or 0) + 1
end

function done(summary, latency, requests)
  common.done(summary, latency, requests)
  local parts = {}
  for _, thread in ipairs(threads) do
    for at, n in pairs(thread:get("counts")) do
      parts[#parts + 1] = string.format("[%d,%d,%d]", math.floor(at / 1000), at % 1000, n)
    end
  end
  io.write("COUNTS [" .. table.concat(parts, ",") .. "]\n")
end
