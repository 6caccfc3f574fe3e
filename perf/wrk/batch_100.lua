-- 100 iris rows per request to /api/v1/batch_predict (use_cache false). The
-- body is written by perf/run.py; pass its path after --:
--   wrk ... -s perf/wrk/batch_100.lua URL/api/v1/batch_predict -- batch_100.json
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done

function init(args)
  common.post_json(common.read(args[1]))
end
