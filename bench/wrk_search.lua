-- wrk script for the abloop proxy: POST /api/v1/search with varying queries and user ids.
-- Used by bench/proxy_overhead.py: wrk -s bench/wrk_search.lua http://127.0.0.1:PORT/api/v1/search
-- Env: BENCH_USERS (distinct user ids per wrk thread, default 5000).

local queries = {
  "How do I write a list comprehension?",
  "What does the with statement do?",
  "How are exceptions raised and caught?",
  "What is the difference between is and ==?",
  "How do generators and yield work?",
  "What are keyword-only arguments?",
  "How does string formatting with f-strings work?",
  "What is a context manager?",
}
local users = tonumber(os.getenv("BENCH_USERS") or "5000")
local headers = { ["Content-Type"] = "application/json" }
local path = nil
local id_tag = "t"
local counter = 0

local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tag", "t" .. next_id)
  table.insert(threads, thread)
end

function init(args)
  path = wrk.path
  id_tag = tag or "t"  -- the global set by setup() through thread:set
end

function request()
  counter = counter + 1
  local body = string.format('{"query": "%s", "user_id": "u%s-%d"}',
    queries[(counter % #queries) + 1], id_tag, counter % users)
  return wrk.format("POST", path, headers, body)
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
