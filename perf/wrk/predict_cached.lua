-- The same iris input on every request with use_cache true: after the first
-- request every one is a cache hit.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done
common.post_json('{"model_name":"iris_classifier","features":[5.1,3.5,1.4,0.2],"use_cache":true}')
