-- A new random iris input on every request with use_cache true, so every
-- request is a cache miss: the model runs and the cache is looked up and
-- written. Features are uniform within the ranges of the iris data set.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done
common.post_json(nil)

local low = {4.3, 2.0, 1.0, 0.1}
local span = {3.6, 2.4, 5.9, 2.4}
local template = '{"model_name":"iris_classifier","features":[%.3f,%.3f,%.3f,%.3f],"use_cache":true}'

-- Each thread gets its own seed; with one shared seed, threads would send
-- the same sequence and all but the first would hit the cache.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + (id or 0))
end

local function feature(i)
  return low[i] + span[i] * math.random()
end

function request()
  return wrk.format(nil, nil, nil, string.format(template, feature(1), feature(2), feature(3), feature(4)))
end
