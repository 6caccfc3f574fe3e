-- One iris row per request to Seldon MLServer's V2 inference endpoint
-- (POST /v2/models/iris_classifier/infer), the row predict_uncached.lua sends
-- to our server. MLServer caches nothing by default, so every request runs
-- the model. Driven by perf/mlserver.py.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done
common.post_json('{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}')
