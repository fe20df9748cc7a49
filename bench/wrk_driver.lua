-- wrk script for bench/wrk_client.py: closed-loop POSTs of pre-encoded JSON bodies, one per line of the file
-- named after `--`, in order; it stops once every body has been answered (or wrk's -d ends first). At the end,
-- connections may send up to (connections - 1) bodies again from the top: their answers are not counted.
-- Counts texts (entries) and prompt tokens from each 200 response, and prints one WRK_RESULT JSON line.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  bodies = {}
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = line
  end
  sent, answered, ok, failed, texts, tokens = 0, 0, 0, 0, 0, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  sent = sent + 1
  return wrk.format(nil, nil, nil, bodies[(sent - 1) % #bodies + 1])
end

function response(status, headers, body)
  answered = answered + 1
  if answered > #bodies then  -- a connection that sent past the end (bodies cycle) while the last ones ran
    return
  end
  if status == 200 then
    local _, entries = string.gsub(body, '"object":%s*"embedding"', "")
    texts = texts + entries
    tokens = tokens + (tonumber(string.match(body, '"prompt_tokens":%s*(%d+)')) or 0)
    ok = ok + 1
  else
    failed = failed + 1
  end
  if answered == #bodies then  -- wrk's main thread sleeps out -d: the caller interrupts it on this line
    io.write("WRK_ALL_ANSWERED\n")
    io.flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local totals = {ok = 0, failed = 0, texts = 0, tokens = 0}
  for _, thread in ipairs(threads) do
    for key, _ in pairs(totals) do
      totals[key] = totals[key] + thread:get(key)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"ok":%d,"failed":%d,"socket_errors":%d,"texts":%d,"tokens":%d,"duration_us":%d,' ..
    '"p50_us":%d,"p95_us":%d,"p99_us":%d}\n',
    totals.ok, totals.failed, e.connect + e.read + e.write + e.timeout, totals.texts, totals.tokens,
    summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
