-- predict_uncached with a random pause before each request on every connection, so
-- that 32 connections offer about half of what 2 workers answer here: wrk 4
-- cannot hold a fixed request rate, and this is the nearest it comes to one.
-- The report gives the rate reached as a share of predict_uncached at c32.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done
common.post_json('{"model_name":"iris_classifier","features":[5.1,3.5,1.4,0.2],"use_cache":false}')

-- Pauses of 0 to 8 ms, 4 on average: equal pauses would keep the 32
-- connections in step, and their requests would arrive together in bursts.
local PAUSE_MS = 8

function init(args)
  math.randomseed(os.time())
end

function delay()
  return math.random(0, PAUSE_MS)
end
