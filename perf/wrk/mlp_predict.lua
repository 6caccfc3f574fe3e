-- One big_mlp row per request to /api/v1/predict (use_cache false), for
-- perf/batching.py; the body is written by the harness, pass its path after --:
--   wrk ... -s perf/wrk/mlp_predict.lua URL/api/v1/predict -- mlp_predict.json
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done

function init(args)
  common.post_json(common.read(args[1]))
end
