-- The soak benchmark's mix (python -m perf soak), one request at a time:
--   40% a new random iris row, use_cache true (a miss: the caches fill)
--   40% a row drawn from 100,000 with a Zipf(1.1) popularity (mostly hits)
--   10% a batch of 100 rows from the body file passed after -- (batch_100.json)
--   10% a bad request (wrong width, unknown model, a string feature, broken JSON)
-- The URL is the server's root: paths are chosen here.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done

local N, S = 100000, 1.1
local low = {4.3, 2.0, 1.0, 0.1}
local span = {3.6, 2.4, 5.9, 2.4}
local step = {0.6180339887, 0.4142135624, 0.7320508076, 0.2360679775}
local template = '{"model_name":"iris_classifier","features":[%.6f,%.6f,%.6f,%.6f],"use_cache":true}'
local headers = {["Content-Type"] = "application/json"}
local bad = {
  '{"model_name":"iris_classifier","features":[1,2,3]}',
  '{"model_name":"no_such_model","features":[1,2,3,4]}',
  '{"model_name":"iris_classifier","features":[1,"two",3,4]}',
  '{"model_name":"iris_classifier","features":[1,2,3,4]',
}
local cumulative, batch = {}, nil

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + (id or 0))
  batch = common.read(args[1])
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

local function row(point)
  local v = {}
  for i = 1, 4 do v[i] = low[i] + span[i] * point(i) end
  return string.format(template, v[1], v[2], v[3], v[4])
end

function request()
  local u = math.random()
  if u < 0.4 then
    return wrk.format("POST", "/api/v1/predict", headers, row(function() return math.random() end))
  elseif u < 0.8 then
    local k = rank()
    return wrk.format("POST", "/api/v1/predict", headers, row(function(i) return (k * step[i]) % 1 end))
  elseif u < 0.9 then
    return wrk.format("POST", "/api/v1/batch_predict", headers, batch)
  end
  return wrk.format("POST", "/api/v1/predict", headers, bad[math.random(#bad)])
end
