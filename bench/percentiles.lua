-- A wrk script that prints more of the latency distribution than `--latency` does, on one line
-- (microseconds):  wrk -t1 -c32 -d5s -s bench/percentiles.lua http://127.0.0.1:PORT/hello/
done = function(summary, latency, requests)
  local out = string.format("req/s %.0f", summary.requests / (summary.duration / 1e6))
  for _, p in ipairs({50, 90, 95, 97, 98, 99, 99.5, 99.9, 99.99}) do
    out = out .. string.format(" p%s=%d", p, latency:percentile(p))
  end
  io.write(out .. string.format(" max=%d\n", latency.max))
end
