-- GET /health: the cost of the HTTP stack, Falcon and our middleware with no
-- request body and no model.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done
