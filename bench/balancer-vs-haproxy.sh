#!/usr/bin/env bash
# Side-by-side benchmark: the same two backends behind `paddock balancer` and behind HAProxy
# (Debian's package), loaded by the same `wrk`, in the same run, alternating rounds. Prints
# throughput, p50 and p99 of each and their ratios, each balancer's CPU time per request, and how
# busy each CPU of the machine was: where every CPU is busy, the load generator and the backends
# limit the round as much as the balancer does.
#
# Summary: the median of the rounds (with their range), because on a shared machine one round
# in a few is slowed by other work and a mean would follow that round; and in how many rounds
# Paddock did at least as well as the HAProxy round just before it.
#
#   bench/balancer-vs-haproxy.sh                 # 7 rounds of 5 s per side, backend and setup
#   ROUNDS=1 DURATION=5s bench/balancer-vs-haproxy.sh
#   BACKENDS=static bench/balancer-vs-haproxy.sh # only the nginx backends
#
# Backends: "static" is nginx (one worker) answering a fixed body on two ports, so that the
# balancer itself is what is measured; "frontends" is two `paddock frontend` serving the hello
# component. Both answer /_paddock/health with a health report, and both balancers check it
# every 500 ms (fall 2, rise 2), round-robin, keep-alive to the backends, X-Forwarded-For added.
#
# Setups: "1": HAProxy `nbthread 1`, `paddock balancer --threads 1`, the balancer pinned to CPU 1
# and wrk and the backends to CPU 0. "2": `nbthread 2` and `--threads 2`, each balancer as it
# comes: HAProxy's threads unbound; Paddock's two loops bound to the two CPUs on a 2-CPU machine
# (its default with one loop per CPU), unbound on a larger one. "2-pinned": each balancer thread bound to its own CPU (HAProxy `cpu-map
# auto:1/1-2 0-1`, Paddock `--pin-threads on`). "2-free": no balancer thread bound (Paddock
# `--pin-threads off`; not Paddock's default, kept to show why it binds). wrk and the backends
# are never pinned with 2 threads. Loopback only.
#
#   SETUPS="2 2-pinned 2-free" bench/balancer-vs-haproxy.sh
#
# TLS=1: clients come over HTTPS (the test certificate of fixtures/tls, an ECDSA P-256 key;
# Paddock `--tls-cert/--tls-key`, HAProxy `bind ... ssl crt ... alpn http/1.1`, OpenSSL); the
# backends are still reached over plain HTTP. wrk's connections stay open, so the handshakes are
# a warm-up's: what is measured is the encryption of each request and response. The protocol
# and cipher each balancer agreed with an OpenSSL client are printed.
#
#   TLS=1 INSTRUCTIONS=0 bench/balancer-vs-haproxy.sh
#
# ACCESS_LOG=1: both balancers log every request to a file: Paddock `--access-log` (JSON lines,
# buffered per event loop, written by a thread of its own), HAProxy `option httplog` to
# `log stdout` (one write per line from the thread that served the request); stdout is a file.
# The files are removed after each round.
#
#   ACCESS_LOG=1 BACKENDS=static SETUPS="1 2" bench/balancer-vs-haproxy.sh
#
# Two figures do not depend on how busy the machine is, and are measured in every run: the TCP
# segments each request costs on loopback (both sides of every connection, from the machine-wide
# `nstat` counter, so health checks and connection setup count too: compare the two balancers
# in the same setup, not the figure with other machines), and
# the balancer's user-space instructions per request, counted by valgrind's callgrind (one
# thread, 8 connections, counters zeroed after the warm-up; INSTRUCTIONS=0 skips it;
# KEEP_CALLGRIND=PREFIX keeps each profile as PREFIX.haproxy and PREFIX.paddock).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

ROUNDS=${ROUNDS:-7}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-32}
BACKENDS=${BACKENDS:-static frontends}
SETUPS=${SETUPS:-1 2 2-pinned 2-free}

need wrk wrk
need haproxy haproxy
need nginx nginx-light
need nstat iproute2
INSTRUCTIONS=${INSTRUCTIONS:-1}
[ "$INSTRUCTIONS" = 1 ] && need valgrind valgrind
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
bench_start

B1=$(port); B2=$((B1 + 1))
LB=$(port); LB_ADMIN=$((LB + 1))
PATH_UNDER_TEST=/hello/
TLS=${TLS:-0}
SCHEME=http
PADDOCK_TLS=()
if [ "$TLS" = 1 ]; then
  need openssl openssl
  SCHEME=https
  PADDOCK_TLS=(--tls-cert fixtures/tls/cert.pem --tls-key fixtures/tls/key.pem)
  cat fixtures/tls/cert.pem fixtures/tls/key.pem >"$work/haproxy.pem"
  export HAPROXY_BIND_OPTS="ssl crt $work/haproxy.pem alpn http/1.1"
fi
URL="$SCHEME://127.0.0.1:$LB$PATH_UNDER_TEST"
ACCESS_LOG=${ACCESS_LOG:-0}
PADDOCK_LOG=()
if [ "$ACCESS_LOG" = 1 ]; then
  PADDOCK_LOG=(--access-log "$work/paddock-access.log")
  export HAPROXY_ACCESS_LOG=1
fi

# tls_agreed: the protocol and cipher the balancer on $LB agrees with an OpenSSL client.
tls_agreed() {
  openssl s_client -connect "127.0.0.1:$LB" -alpn http/1.1 </dev/null 2>/dev/null |
    awk '/^New, / {sub(/^New, /, ""); print; exit}'
}

# run_wrk THREADS URL -> "requests_per_sec p50_ms p99_ms errors"
run_wrk() {
  local threads=$1 url=$2 out
  if [ "$threads" = 1 ]; then
    out=$(taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$url")
  else
    out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "$url")
  fi
  local rps p50 p99 errors
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx or 3xx responses/ {n += $NF} /Socket errors/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out")
  echo "$rps $(to_ms "$p50") $(to_ms "$p99") $errors"
}

start_backends() { # kind threads
  local kind=$1 threads=$2 prefix=()
  [ "$threads" = 1 ] && prefix=(taskset -c 0)
  case $kind in
    static)
      mkdir -p "$work/nginx"
      static_nginx_conf "$B1" "$B2" >"$work/nginx/nginx.conf"
      "${prefix[@]}" "$NGINX" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>>"$work/nginx/error.log" &
      ;;
    frontends)
      for i in 1 2; do
        local p=$B1; [ $i = 2 ] && p=$B2
        mkdir -p "$work/fe$i/apps/hello"
        cp fixtures/apps/packages/hello-v1/* "$work/fe$i/apps/hello/"
        RUST_LOG=warn "${prefix[@]}" "$PADDOCK" frontend --name "s$i" --listen "127.0.0.1:$p" \
          --apps "$work/fe$i/apps" --data "$work/fe$i/data" >"$work/fe$i.log" 2>&1 &
      done
      ;;
  esac
  wait_http "http://127.0.0.1:$B1$PATH_UNDER_TEST"
  wait_http "http://127.0.0.1:$B2$PATH_UNDER_TEST"
}

stop_backends() {
  [ -f "$work/nginx/nginx.pid" ] && kill "$(cat "$work/nginx/nginx.pid")" 2>/dev/null || true
  pkill -f -- "--data $work/fe" 2>/dev/null || true
  sleep 0.5
}

start_balancer() { # kind setup -> pid
  local kind=$1 setup=$2 threads=${2%%-*} prefix=() pin=() cpumap=""
  [ "$setup" = 1 ] && prefix=(taskset -c 1)
  case $setup in
    instructions) threads=1
      prefix=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out") ;;
    2-pinned) pin=(--pin-threads on) cpumap="cpu-map auto:1/1-2 0-1" ;;
    2-free) pin=(--pin-threads off) ;;
  esac
  case $kind in
    paddock)
      routing_table "$B1" "$B2" >"$work/table.json"
      RUST_LOG=warn "${prefix[@]}" "$PADDOCK" balancer --name bench --table "$work/table.json" \
        --listen "127.0.0.1:$LB" --admin "127.0.0.1:$LB_ADMIN" --data "$work/lb" \
        --threads "$threads" "${pin[@]}" "${PADDOCK_TLS[@]}" "${PADDOCK_LOG[@]}" \
        >"$work/paddock-balancer.log" 2>&1 &
      ;;
    haproxy)
      haproxy_conf "$LB" "$B1" "$B2" "nbthread $threads" ${cpumap:+"$cpumap"} >"$work/haproxy.cfg"
      "${prefix[@]}" "$HAPROXY" -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
      ;;
  esac
  echo $!
}

HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # pid -> user + system ticks

# stop_balancer PID: SIGTERM, then waits until it is gone (it was started in a subshell, so
# `wait` cannot), so that the next one starts on a free port.
stop_balancer() {
  kill "$1" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
}

declare -A RPS P50 P99 CPU ERR SEG IR BUSY
for backend in $BACKENDS; do
  for setup in $SETUPS; do
    threads=${setup%%-*}
    start_backends "$backend" "$threads"
    for round in $(seq 1 "$ROUNDS"); do
      for kind in haproxy paddock; do
        pid=$(start_balancer "$kind" "$setup")
        wait_http "$URL" ||
          { tail -n 20 "$work/paddock-balancer.log" "$work/haproxy.log" >&2 2>/dev/null; exit 1; }
        if [ "$TLS" = 1 ] && [ "$round" = 1 ]; then
          echo "$kind: TLS agreed with an OpenSSL client: $(tls_agreed)"
        fi
        wrk -t1 -c4 -d1s "$URL" >/dev/null # warm-up
        read -r ticks0 < <(cpu_ticks "$pid")
        nstat -n
        times0=$(cpu_times)
        read -r rps p50 p99 errors < <(run_wrk "$threads" "$URL")
        read -r ticks1 < <(cpu_ticks "$pid")
        busy=$(busy_shares "$times0" "$(cpu_times)")
        requests=$(awk -v r="$rps" -v d="${DURATION%s}" 'BEGIN {print r * d}') # answered
        # TCP segments sent on loopback (every side of every connection) per request.
        segments=$(nstat -z TcpOutSegs | awk -v n="$requests" \
          '$1 == "TcpOutSegs" {printf "%.2f", $2 / n}')
        stop_balancer "$pid"
        if [ "$ACCESS_LOG" = 1 ]; then
          logged=$([ "$kind" = paddock ] && wc -l <"$work/paddock-access.log" ||
            grep -c ' "GET ' "$work/haproxy.log" || true)
          echo "$kind: $logged requests in its access log"
          rm -f "$work/paddock-access.log" "$work/haproxy.log"
        fi
        # The balancer's CPU time (user + system, all threads) per request.
        cpu=$(awk -v t=$((ticks1 - ticks0)) -v hz="$HZ" -v n="$requests" \
          'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
        printf '%-9s %-8s %-8s round %s: %9.0f req/s  p50 %7.3f ms  p99 %7.3f ms  cpu %5.1f us/req  segments %s/req  CPUs busy %s %%  errors %s\n' \
          "$backend" "$kind" "$setup" "$round" "$rps" "$p50" "$p99" "$cpu" "$segments" "$busy" "$errors"
        key="$backend-$kind-$setup"
        CPU[$key]+="$cpu "
        RPS[$key]+="$rps "
        P50[$key]+="$p50 "
        P99[$key]+="$p99 "
        SEG[$key]+="$segments "
        BUSY[$key]+="$busy "
        ERR[$key]=$(( ${ERR[$key]:-0} + errors ))
      done
    done
    stop_backends
  done
done

# instructions_per_request KIND: the balancer under callgrind, one thread, serving 8 connections
# for DURATION after a warm-up; its user-space instructions per request.
instructions_per_request() {
  local kind=$1 pid requests
  rm -f "$work"/callgrind.out*
  pid=$(start_balancer "$kind" instructions)
  wait_http "$URL" || { echo "no answer under valgrind" >&2; exit 1; }
  wrk -t1 -c4 -d1s "$URL" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  requests=$(wrk -t1 -c8 -d"$DURATION" "$URL" | awk '/requests in/ {print $1}')
  callgrind_control -d "$pid" >/dev/null 2>&1
  stop_balancer "$pid"
  [ -s "$work/callgrind.out.1" ] && [ "${requests:-0}" -gt 0 ] || {
    echo "no instruction count for $kind: callgrind wrote no dump or wrk got no answer; see $work/*.log (INSTRUCTIONS=0 skips this)" >&2
    exit 1
  }
  # KEEP_CALLGRIND=PREFIX keeps the profile as PREFIX.KIND (for callgrind_annotate).
  [ -n "${KEEP_CALLGRIND:-}" ] && cp "$work/callgrind.out.1" "$KEEP_CALLGRIND.$kind"
  awk -v r="$requests" '/^totals:/ {printf "%.0f", $2 / r}' "$work/callgrind.out.1"
}

if [ "$INSTRUCTIONS" = 1 ]; then
  start_backends static 2
  for kind in haproxy paddock; do
    IR[$kind]=$(instructions_per_request "$kind")
    echo "static    $kind  user-space instructions per request (callgrind): ${IR[$kind]}"
  done
  stop_backends
fi

# wins BETTER PADDOCK HAPROXY: in how many rounds Paddock's value was at least as good as the
# HAProxy round just before it ("higher" or "lower" is better), as "k/n".
wins() {
  awk -v better="$1" -v p="$2" -v h="$3" 'BEGIN {
    n = split(p, pv, " "); split(h, hv, " "); k = 0
    for (i = 1; i <= n; i++) k += (better == "higher") ? (pv[i] >= hv[i]) : (pv[i] <= hv[i])
    printf "%d/%d", k, n }'
}

echo
echo "machine: $(nproc) cores, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//'); $(date -u +%Y-%m-%d)"
echo "haproxy: $("$HAPROXY" -v | head -1)"
echo "load: wrk, $CONNECTIONS keep-alive connections over $SCHEME, $DURATION per run, $ROUNDS rounds per side, alternating"
[ "$ACCESS_LOG" = 1 ] && echo "access logs: on, to a file (Paddock --access-log, HAProxy option httplog to log stdout)"
echo "figures: the median of the rounds, [their range]"
printf '%-9s %-9s %-8s %10s %15s %9s %15s %11s %9s %10s %7s\n' backend setup balancer "req/s" "[range]" "p50 ms" "p99 ms" "cpu us/req" "segs/req" "CPUs busy%" errors
for backend in $BACKENDS; do
  for setup in $SETUPS; do
    for kind in haproxy paddock; do
      key="$backend-$kind-$setup"
      printf '%-9s %-9s %-8s %10.0f %15s %9.3f %7.3f %-7s %11.1f %9.2f %10s %7s\n' "$backend" "$setup" "$kind" \
        "$(median ${RPS[$key]})" "[$(range %.0f ${RPS[$key]})]" "$(median ${P50[$key]})" \
        "$(median ${P99[$key]})" "[$(range %.2f ${P99[$key]})]" "$(median ${CPU[$key]})" \
        "$(median ${SEG[$key]})" "$(median_each ${BUSY[$key]})" "${ERR[$key]}"
    done
    p="$backend-paddock-$setup" h="$backend-haproxy-$setup"
    awk -v pr="$(median ${RPS[$p]})" -v hr="$(median ${RPS[$h]})" \
      -v p5="$(median ${P50[$p]})" -v h5="$(median ${P50[$h]})" \
      -v pp="$(median ${P99[$p]})" -v hp="$(median ${P99[$h]})" \
      -v b="$backend" -v t="$setup" -v wr="$(wins higher "${RPS[$p]}" "${RPS[$h]}")" \
      -v wp="$(wins lower "${P99[$p]}" "${P99[$h]}")" \
      'BEGIN { printf "%s, %s: throughput paddock/haproxy = %.2fx (goal >= 1.00; as good in %s rounds), p50 = %.2fx, p99 = %.2fx (goal <= 1.00; as good in %s rounds)\n", b, t, pr / hr, wr, p5 / h5, pp / hp, wp }'
  done
done
if [ "$INSTRUCTIONS" = 1 ]; then
  awk -v p="${IR[paddock]}" -v h="${IR[haproxy]}" 'BEGIN {
    printf "user-space instructions per request (callgrind, static backend, 1 thread): haproxy %d, paddock %d, paddock/haproxy = %.2fx\n", h, p, p / h }'
fi
