-- wrk script for an OpenAI-compatible endpoint: POST /v1/chat/completions with one fixed small body.
-- Used by bench/proxy_overhead.py for the stub called directly and for the LiteLLM proxy.
-- Env: BENCH_BODY (the JSON body; default: a small chat request for BENCH_MODEL),
--      BENCH_MODEL (model name in the default body), BENCH_AUTH (optional bearer token).

local model = os.getenv("BENCH_MODEL") or "stub-model"
local auth = os.getenv("BENCH_AUTH")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if auth and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end
wrk.body = os.getenv("BENCH_BODY")
if not wrk.body or wrk.body == "" then
  wrk.body = string.format(
  '{"model": "%s", "messages": [' ..
  '{"role": "system", "content": "Answer the question using the passages."}, ' ..
  '{"role": "user", "content": "How do I write a list comprehension?"}], ' ..
  '"max_tokens": 256, "temperature": 0.2}', model)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, "err_timeout": %d, ' ..
    '"mean_us": %.1f, "max_us": %d, "p50_us": %d, "p75_us": %d, "p90_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(75),
    latency:percentile(90), latency:percentile(99)))
end
