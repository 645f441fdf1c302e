-- wrk script for bench/run.py: POST a fixed JSON body and report a JSON summary.
-- Usage: [BENCH_AUTH='Bearer <token>'] wrk ... -s bench/post.lua <url> -- <body-file> [header:value ...]
-- The body is read from a file so the harness controls it; one pre-formatted request is reused.
-- BENCH_AUTH, when set and not empty, is sent as the Authorization header of every request (an env var
-- rather than an argument, so the token is not on wrk's command line).

local req

function init(args)
  local path = args[1]
  if path == nil then
    error("post.lua: missing body file argument (wrk ... -- <body-file>)")
  end
  local f = assert(io.open(path, "rb"))
  local body = f:read("*a")
  f:close()
  local headers = { ["Content-Type"] = "application/json", ["Accept"] = "*/*" }
  local auth = os.getenv("BENCH_AUTH")
  if auth ~= nil and auth ~= "" then
    headers["Authorization"] = auth
  end
  for i = 2, #args do
    local name, value = string.match(args[i], "^([^:]+):%s*(.*)$")
    if name then
      headers[name] = value
    end
  end
  req = wrk.format("POST", nil, headers, body)
end

function request()
  return req
end

-- One machine-readable line; latency figures are microseconds.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
