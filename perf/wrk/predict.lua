-- One uncached iris prediction per request (use_cache false, so every
-- request runs the model).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model_name":"iris_classifier","features":[5.1,3.5,1.4,0.2],"use_cache":false}'

done = function(summary, latency, requests)
  io.write(string.format("JSON {\"requests\":%d,\"duration_us\":%d,\"non2xx\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"timeout\":%d,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"p999_us\":%d}\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
