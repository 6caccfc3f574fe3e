-- One iris row per request to /v2/models/iris_classifier/infer as a JSON
-- tensor, use_cache false (the row of predict_uncached.lua, so the two
-- compare the protocols over the same work).
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done
common.post_json('{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}],'
  .. '"parameters":{"use_cache":false}}')
