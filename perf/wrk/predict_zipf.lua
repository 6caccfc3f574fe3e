-- A mixed workload: inputs drawn from 1,000,000 distinct iris-like rows with
-- a Zipf(1.1) popularity, use_cache true, so popular inputs hit the cache and
-- the long tail keeps missing. The harness reports the hit ratio of each run:
-- it rises as the caches fill (about 7 in 10 in a 5 s run from cold, L1 only).
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done
common.post_json(nil)

local N, S = 1000000, 1.1
local low = {4.3, 2.0, 1.0, 0.1}
local span = {3.6, 2.4, 5.9, 2.4}
local template = '{"model_name":"iris_classifier","features":[%.6f,%.6f,%.6f,%.6f],"use_cache":true}'
local cumulative = {}

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + (id or 0))
  local total = 0
  for k = 1, N do
    total = total + 1 / k ^ S
    cumulative[k] = total
  end
  for k = 1, N do
    cumulative[k] = cumulative[k] / total
  end
end

local function rank()
  local u, lo, hi = math.random(), 1, N
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cumulative[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end

-- Row k is a fixed point of the iris ranges (the same k, the same row). Each
-- feature steps by its own irrational fraction and keeps 6 decimals, so the
-- rows of different ranks differ (multiples of one step would repeat rows).
local step = {0.6180339887, 0.4142135624, 0.7320508076, 0.2360679775}
local function feature(k, i)
  return low[i] + span[i] * ((k * step[i]) % 1)
end

function request()
  local k = rank()
  return wrk.format(nil, nil, nil, string.format(template, feature(k, 1), feature(k, 2), feature(k, 3), feature(k, 4)))
end
