#!/usr/bin/env bash
# What each balancer's way of sending costs the processes on the other end: the same static
# backends (nginx, one worker) behind `paddock balancer` and behind HAProxy (Debian's package),
# one balancer thread on CPU 1, wrk and nginx on CPU 0 (the "1" setup of
# balancer-vs-haproxy.sh), alternating rounds. For each round, per request answered:
#
# - the balancer's system calls (epoll_wait, recvfrom, sendto; from the kernel's syscall
#   tracepoints, counted by `perf stat`) and its user and system CPU time (/proc/PID/stat);
# - wrk's and nginx's epoll_wait calls and CPU time: how often a response or a request reached
#   them on its own, so that they went back to the kernel for each, or with others.
#
# Throughput moves with the machine's speed from round to round; these counts do not, which is
# what makes them worth comparing when the throughput ratio is within the noise.
#
#   bench/balancer-wakeups.sh               # 3 rounds per side, 8 s each, counted over 4 s
#   ROUNDS=5 bench/balancer-wakeups.sh
#
# Needs `perf` (Debian's linux-perf) and access to the syscall tracepoints (root, or
# kernel.perf_event_paranoid at most 1 and a readable tracefs). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-32}
need wrk wrk
need haproxy haproxy
need nginx nginx-light
need perf linux-perf
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
perf stat -e syscalls:sys_enter_sendto -- true >/dev/null 2>&1 || {
  echo "perf cannot count the syscall tracepoints here: run as root, or lower kernel.perf_event_paranoid" >&2
  exit 1
}
bench_start

B1=$(port); B2=$((B1 + 1))
LB=$(port); LB_ADMIN=$((LB + 1))
URL="http://127.0.0.1:$LB/hello/"
SAMPLE=4 # seconds counted, in the middle of an 8 s wrk run
HZ=$(getconf CLK_TCK)

mkdir -p "$work/nginx"
static_nginx_conf "$B1" "$B2" >"$work/nginx/nginx.conf"
taskset -c 0 "$NGINX" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>>"$work/nginx/error.log" &
wait_http "http://127.0.0.1:$B1/hello/"
wait_http "http://127.0.0.1:$B2/hello/"
NGINX_WORKER=$(pgrep -f "nginx: worker" -P "$(cat "$work/nginx/nginx.pid")" | head -1)

BALANCER_EVENTS=syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto
PEER_EVENTS=syscalls:sys_enter_epoll_wait,task-clock

# ticks PID: user and system clock ticks of a process.
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

# count FILE NAME: an event's count from `perf stat -x,` output.
count() { awk -F, -v e="$2" '$3 == e {print $1}' "$1"; }

# per COUNT, us MS: a count, and a task-clock in ms, per request of the round ($n).
per() { awk -v c="$1" -v n="$n" 'BEGIN {printf "%.2f", c / n}'; }
us() { awk -v ms="$1" -v n="$n" 'BEGIN {printf "%.1f", ms * 1000 / n}'; }

start_balancer() { # kind -> pid
  case $1 in
    paddock)
      routing_table "$B1" "$B2" >"$work/table.json"
      RUST_LOG=warn taskset -c 1 "$PADDOCK" balancer --name bench --table "$work/table.json" \
        --listen "127.0.0.1:$LB" --admin "127.0.0.1:$LB_ADMIN" --data "$work/lb" --threads 1 \
        >"$work/paddock-balancer.log" 2>&1 &
      ;;
    haproxy)
      haproxy_conf "$LB" "$B1" "$B2" "nbthread 1" >"$work/haproxy.cfg"
      taskset -c 1 "$HAPROXY" -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
      ;;
  esac
  echo $!
}

stop_balancer() {
  kill "$1" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
}

printf '%-8s %5s %9s | %-31s | %-12s | %-19s | %-19s\n' "" "" "" \
  "balancer, per request" "balancer CPU" "wrk, per request" "nginx, per request"
printf '%-8s %5s %9s | %10s %9s %10s | %5s %6s | %10s %8s | %10s %8s\n' balancer round "req/s" \
  epoll_wait recvfrom sendto "user" "system" epoll_wait "CPU" epoll_wait "CPU"
for round in $(seq 1 "$ROUNDS"); do
  for kind in haproxy paddock; do
    pid=$(start_balancer "$kind")
    wait_http "$URL" || { tail -n 20 "$work"/*.log >&2; exit 1; }
    wrk -t1 -c4 -d1s "$URL" >/dev/null # warm-up
    taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d8s "$URL" >"$work/wrk.out" &
    load=$!
    sleep 2
    wrk_pid=$(pgrep -n -x wrk)
    t0=$(ticks "$pid")
    perf stat -x, -e "$BALANCER_EVENTS" -p "$pid" -o "$work/balancer.stat" -- sleep "$SAMPLE" &
    p1=$!
    perf stat -x, -e "$PEER_EVENTS" -p "$wrk_pid" -o "$work/wrk.stat" -- sleep "$SAMPLE" &
    p2=$!
    perf stat -x, -e "$PEER_EVENTS" -p "$NGINX_WORKER" -o "$work/nginx.stat" -- sleep "$SAMPLE" &
    p3=$!
    wait "$p1" "$p2" "$p3"
    t1=$(ticks "$pid")
    wait "$load"
    stop_balancer "$pid"
    rps=$(awk '/^Requests\/sec/ {print $2}' "$work/wrk.out")
    n=$(awk -v r="$rps" -v s="$SAMPLE" 'BEGIN {print r * s}') # requests in the sample
    read -r u0 s0 <<<"$t0"
    read -r u1 s1 <<<"$t1"
    user=$(awk -v t=$((u1 - u0)) -v hz="$HZ" -v n="$n" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
    system=$(awk -v t=$((s1 - s0)) -v hz="$HZ" -v n="$n" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
    printf '%-8s %5s %9.0f | %10s %9s %10s | %5s %6s | %10s %8s | %10s %8s\n' "$kind" "$round" "$rps" \
      "$(per "$(count "$work/balancer.stat" syscalls:sys_enter_epoll_wait)")" \
      "$(per "$(count "$work/balancer.stat" syscalls:sys_enter_recvfrom)")" \
      "$(per "$(count "$work/balancer.stat" syscalls:sys_enter_sendto)")" \
      "$user" "$system" \
      "$(per "$(count "$work/wrk.stat" syscalls:sys_enter_epoll_wait)")" \
      "$(us "$(count "$work/wrk.stat" task-clock)")µs" \
      "$(per "$(count "$work/nginx.stat" syscalls:sys_enter_epoll_wait)")" \
      "$(us "$(count "$work/nginx.stat" task-clock)")µs"
  done
done
echo
echo "machine: $(nproc) cores, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//'); $(date -u +%Y-%m-%d)"
echo "haproxy: $("$HAPROXY" -v | head -1)"
echo "each balancer one thread on CPU 1; wrk (one thread, $CONNECTIONS keep-alive connections) and nginx (one worker) on CPU 0"
