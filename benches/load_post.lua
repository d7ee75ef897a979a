-- wrk script for benches/load.sh: POSTs the chat-completion body in $WRK_BODY (a file) and, at
-- the end, prints one machine-readable RESULT line (latencies in microseconds). With
-- $WRK_DELAY_MS set, each connection pauses that long before each request: a paced load, since
-- Debian's wrk has no fixed-rate (-R) mode.
local f = assert(io.open(os.getenv("WRK_BODY") or "benches/load_body.json", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
-- $WRK_AUTH: an Authorization value to send (client keys).
local auth = os.getenv("WRK_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = auth
end

local pause_ms = tonumber(os.getenv("WRK_DELAY_MS") or "")
if pause_ms and pause_ms > 0 then
  function delay()
    return pause_ms
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  local secs = summary.duration / 1e6
  io.write(string.format(
    "RESULT requests=%d rps=%.1f p50_us=%d p99_us=%d p999_us=%d max_us=%d errors=%d " ..
    "connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.requests / secs,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    errors, e.connect, e.read, e.write, e.status, e.timeout))
end
