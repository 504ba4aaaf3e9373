# Helpers shared by the benchmark scripts (sourced, not run).

# wait_http URL: waits (at most 60 s) until URL answers 2xx.
wait_http() {
  for _ in $(seq 1 600); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "nothing answers at $1" >&2; return 1
}

# to_ms LATENCY: a wrk latency (1.23ms, 850.00us, 1.02s) in milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else { printf "%s", v } }'
}
