-- Shared by the scenario scripts: the JSON line perf/run.py reads, and the
-- reading of request bodies the harness writes. Loaded with
--   local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
-- so the scripts work from any directory wrk is started in.
local common = {}

-- One machine-readable line; latencies in microseconds as wrk records them.
function common.done(summary, latency, requests)
  io.write(string.format(
    "JSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"non2xx\":%d,"
    .. "\"connect\":%d,\"read\":%d,\"write\":%d,\"timeout\":%d,"
    .. "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"p999_us\":%d,"
    .. "\"mean_us\":%.1f,\"stdev_us\":%.1f,\"max_us\":%d}\n",
    summary.requests, summary.duration, summary.bytes, summary.errors.status,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.stdev, latency.max))
end

function common.read(path)
  local file = path and io.open(path, "rb")
  if not file then
    error("no request body file: pass its path after --, e.g. wrk ... URL -- body.json")
  end
  local body = file:read("*a")
  file:close()
  return body
end

function common.post_json(body)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = body
end

return common
