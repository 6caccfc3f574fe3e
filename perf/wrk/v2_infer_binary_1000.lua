-- 1000 iris rows per request to /v2/models/iris_classifier/infer as one
-- binary FP32 tensor, binary outputs asked for, use_cache false. perf/v2.py
-- writes the body and, beside it, the length of its JSON part; pass the
-- body's path after --:
--   wrk ... -s perf/wrk/v2_infer_binary_1000.lua URL -- v2_infer_binary_1000.body
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
done = common.done

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/octet-stream"
  wrk.headers["Inference-Header-Content-Length"] = common.read(args[1] .. ".header-length")
  wrk.body = common.read(args[1])
end
