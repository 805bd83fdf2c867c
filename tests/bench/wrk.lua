-- wrk script: replay pre-signed webhook deliveries, each sent once.
-- Usage: wrk -t THREADS -s wrk.lua URL -- REQUESTS_FILE THREADS
-- REQUESTS_FILE holds raw HTTP/1.1 requests, each followed by a NUL byte. Threads take
-- disjoint shares (every n-th request). A thread that runs out starts over; `wrapped`
-- in the summary counts those repeats, which the receiver answers as duplicates.

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*a")
  f:close()
  local nthreads = tonumber(args[2])
  reqs, n, wrapped = {}, 0, 0
  local i = 0
  for rec in string.gmatch(data, "([^%z]+)%z") do
    if i % nthreads == id then
      reqs[#reqs + 1] = rec
    end
    i = i + 1
  end
end

function request()
  n = n + 1
  if n > #reqs then
    n, wrapped = 1, wrapped + 1
  end
  return reqs[n]
end

function done(summary, latency, requests)
  local wraps = 0
  for _, t in ipairs(threads) do
    wraps = wraps + (t:get("wrapped") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_ms": %.3f, "p99_ms": %.3f, "wrapped": %d}\n',
    summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, wraps))
end
