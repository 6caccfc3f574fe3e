-- One iris prediction per request with use_cache false, so every request
-- runs the model.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done
common.post_json('{"model_name":"iris_classifier","features":[5.1,3.5,1.4,0.2],"use_cache":false}')
