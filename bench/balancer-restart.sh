#!/usr/bin/env bash
# Restarting a balancer on a new executable under load, side by side: `paddock balancer` on
# SIGUSR2 (in place: same PID and listening sockets, requests in flight finished first) and
# HAProxy's master-worker reload (SIGUSR2 to the master: it runs its executable again, the new
# worker takes the listening sockets over from the old one through `expose-fd listeners`, and
# the old worker finishes its connections). The same nginx backend (one worker answering a fixed
# body on two ports), the same keep-alive wrk load, one restart in the middle of each round,
# alternating rounds. Each balancer runs one thread on CPU 1; wrk and nginx run on CPU 0.
#
# Prints, per side, the requests answered, the failed ones (wrk's socket errors and non-2xx
# answers: what a client that does not reconnect by itself sees), the p99 and the longest request
# of the round (the pause the restart cost the request that waited most).
#
#   bench/balancer-restart.sh             # 5 rounds of 6 s per side, the restart at 3 s
#   ROUNDS=1 bench/balancer-restart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

ROUNDS=${ROUNDS:-5}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-6}
CONNECTIONS=${CONNECTIONS:-32}

need wrk wrk
need haproxy haproxy
need nginx nginx-light
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
bench_start

B1=$(port); B2=$((B1 + 1))
LB=$(port); LB_ADMIN=$((LB + 1))
URL=http://127.0.0.1:$LB/hello/

mkdir -p "$work/nginx"
static_nginx_conf "$B1" "$B2" >"$work/nginx/nginx.conf"
taskset -c 0 "$NGINX" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>>"$work/nginx/error.log" &
wait_http "http://127.0.0.1:$B1/hello/"

# Paddock runs from its own copy of the executable, which each restart replaces (by rename) with
# a new build: the same program with bytes appended; the one replaced is kept as paddock.previous.
mkdir -p "$work/bin"
cp "$PADDOCK" "$work/bin/paddock"
routing_table "$B1" "$B2" >"$work/table.json"
haproxy_conf "$LB" "$B1" "$B2" "nbthread 1" \
  "stats socket $work/haproxy.sock mode 600 level admin expose-fd listeners" >"$work/haproxy.cfg"

start_balancer() { # kind -> pid (HAProxy: its master)
  case $1 in
    paddock)
      RUST_LOG=info taskset -c 1 "$work/bin/paddock" balancer --name bench --table "$work/table.json" \
        --listen "127.0.0.1:$LB" --admin "127.0.0.1:$LB_ADMIN" --data "$work/lb" --threads 1 \
        >"$work/paddock-balancer.log" 2>&1 &
      ;;
    haproxy)
      taskset -c 1 "$HAPROXY" -W -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
      ;;
  esac
  echo $!
}

# prepare KIND: readies what the restart installs (off the clock).
prepare() {
  if [ "$1" = paddock ]; then
    cp "$PADDOCK" "$work/bin/paddock.new"
    printf 'build %s' "$RANDOM" >>"$work/bin/paddock.new"
    chmod 755 "$work/bin/paddock.new"
  fi
}

restart() { # kind pid
  case $1 in
    # The old executable stays, as `paddock.previous` (the way back): its file is not freed
    # when the process leaves it, which cost 20-57 ms (a 228 MB file's page cache dropped at
    # `exec`) when the rename unlinked it.
    paddock)
      ln -f "$work/bin/paddock" "$work/bin/paddock.previous"
      mv "$work/bin/paddock.new" "$work/bin/paddock"
      kill -USR2 "$2"
      ;;
    haproxy) kill -USR2 "$2" ;;
  esac
}

stop_balancer() { # pid
  kill "$1" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
}

# round KIND -> "requests failed p99_ms max_ms"
round() {
  local kind=$1 pid out
  prepare "$kind"
  pid=$(start_balancer "$kind")
  wait_http "$URL" || { tail -n 20 "$work/paddock-balancer.log" "$work/haproxy.log" >&2 2>/dev/null; exit 1; }
  taskset -c 0 wrk -t1 -c4 -d1s "$URL" >/dev/null # warm-up
  taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_PER_ROUND}s" --latency "$URL" >"$work/wrk.out" &
  local load=$!
  sleep "$(awk -v s="$SECONDS_PER_ROUND" 'BEGIN {print s / 2}')"
  restart "$kind" "$pid"
  wait "$load"
  out=$(cat "$work/wrk.out")
  # The restart happened: Paddock's log says it took the sockets back; HAProxy's master, that
  # a new worker runs.
  case $kind in
    paddock) grep -q "handed over" "$work/paddock-balancer.log" || { echo "paddock did not restart" >&2; exit 1; } ;;
    haproxy) grep -qi "reexecuting\|new worker" "$work/haproxy.log" || { tail "$work/haproxy.log" >&2; echo "haproxy did not reload" >&2; exit 1; } ;;
  esac
  stop_balancer "$pid"
  local requests failed p99 max
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  failed=$(awk '/Non-2xx or 3xx responses/ {n += $NF} /Socket errors/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  max=$(awk '$1=="Latency" {print $4}' <<<"$out")
  # Paddock's own account, from its log: the signal, the drain's end (the old program's last
  # line), the new program taking the sockets, and accepting again.
  if [ "$kind" = paddock ]; then
    awk '/SIGUSR2 received/ {t0 = ts($1)} t0 && /connections closed/ && !d {d = ts($1)} /handed over/ && !h {h = ts($1)} t0 && /balancing on/ && !a {a = ts($1)}
      function ts(s) { split(substr(s, 12, 15), p, ":"); return p[1] * 3600 + p[2] * 60 + p[3] }
      END { printf "  paddock: from the signal: connections closed %.1f ms, sockets taken by the new program %.1f ms, accepting %.1f ms\n", (d - t0) * 1000, (h - t0) * 1000, (a - t0) * 1000 }' \
      "$work/paddock-balancer.log" >&2
  fi
  echo "$requests $failed $(to_ms "$p99") $(to_ms "$max")"
}

echo "machine: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
echo "haproxy: $("$HAPROXY" -v | head -1)"
echo "paddock: $("$PADDOCK" --version)"
declare -A REQ FAIL P99 MAX
for r in $(seq 1 "$ROUNDS"); do
  for kind in haproxy paddock; do
    read -r req failed p99 max <<<"$(round "$kind")"
    echo "round $r $kind: $req requests, $failed failed, p99 $p99 ms, longest $max ms"
    REQ[$kind]+=" $req"; FAIL[$kind]+=" $failed"; P99[$kind]+=" $p99"; MAX[$kind]+=" $max"
  done
done
for kind in haproxy paddock; do
  echo "$kind: failed requests per round:${FAIL[$kind]}; medians: $(median ${REQ[$kind]}) requests, p99 $(median ${P99[$kind]}) ms, longest $(median ${MAX[$kind]}) ms (range $(range %s ${MAX[$kind]}) ms)"
done
