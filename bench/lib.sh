# Helpers shared by the benchmark scripts (sourced, not run).

. scripts/postgres.sh

# wait_http URL: waits (at most 60 s) until URL answers 2xx.
wait_http() {
  for _ in $(seq 1 600); do curl -skf -o /dev/null "$1" && return 0; sleep 0.1; done
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

# median VALUES...: the median of the values (a round slowed by other work on the machine moves
# it less than a mean).
median() {
  tr ' ' '\n' <<<"$*" | grep . | sort -g |
    awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# range FORMAT VALUES...: "min-max", each printed with FORMAT.
range() {
  local format=$1; shift
  tr ' ' '\n' <<<"$*" | grep . | sort -g |
    awk -v f="$format" 'NR == 1 {lo = $1} {hi = $1} END {printf f "-" f, lo, hi}'
}

# median_each VALUES...: for values of one figure per CPU ("99/97"), the median of each CPU's.
median_each() {
  local cpus out="" i
  cpus=$(awk -F/ '{print NF; exit}' <<<"$1")
  for i in $(seq 1 "$cpus"); do
    out+="${out:+/}$(median "$(tr ' ' '\n' <<<"$*" | grep . | cut -d/ -f"$i" | tr '\n' ' ')")"
  done
  echo "$out"
}

# cpu_times: each CPU's busy and idle time so far (clock ticks), a line per CPU, from /proc/stat.
cpu_times() { awk '$1 ~ /^cpu[0-9]+$/ {print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat; }

# busy_shares BEFORE AFTER: each CPU's busy share between two `cpu_times`, in %, as "99/98".
busy_shares() {
  paste -d' ' <(echo "$1") <(echo "$2") |
    awk '{b = $3 - $1; t = b + $4 - $2; printf "%s%.0f", (NR > 1 ? "/" : ""), (t > 0 ? 100 * b / t : 0)}'
}

# need COMMAND PACKAGE: installs the Debian package when the command is missing.
need() {
  command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  }
}

# port: a random loopback port for a server of the benchmark.
port() { echo $((20000 + RANDOM % 20000)); }

# bench_start: builds the release binary (PADDOCK) and makes a work folder (work) that is removed,
# with every process the script started (and a PostgreSQL cluster from start_postgres), on exit.
bench_start() {
  cargo build --quiet --release -p paddock
  PADDOCK=$PWD/target/release/paddock
  work=$(mktemp -d)
  trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; stop_postgres; rm -rf "$work"' EXIT
}

# The balancer benchmarks' backends and configurations, the same for both balancers.

# health_json NAME: what a front-end named NAME serving `hello` answers on /_paddock/health.
health_json() {
  printf '{"server":"%s","state":"serving","apps":[{"name":"hello","version":"v1","route":"/hello","component_sha256":""}],"in_flight":0}' "$1"
}

# static_nginx_conf B1 B2: an nginx config (one worker, files in $work/nginx) answering a fixed
# body, and a health report, on loopback ports B1 and B2.
static_nginx_conf() {
  cat <<EOF
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  client_body_temp_path $work/nginx;
  server { listen 127.0.0.1:$1;
    location = /_paddock/health { default_type application/json; return 200 '$(health_json s1)'; }
    location / { default_type text/plain; return 200 "hello from v1\n"; } }
  server { listen 127.0.0.1:$2;
    location = /_paddock/health { default_type application/json; return 200 '$(health_json s2)'; }
    location / { default_type text/plain; return 200 "hello from v1\n"; } }
}
EOF
}

# routing_table B1 B2: `paddock balancer --table` JSON routing /hello round-robin to two servers.
routing_table() {
  cat <<EOF
{"generation": 1,
 "zones": [{"zone": "default", "policy": "round-robin", "upstreams": [
   {"name": "s1", "address": "127.0.0.1:$1", "state": "ready", "weight": 1},
   {"name": "s2", "address": "127.0.0.1:$2", "state": "ready", "weight": 1}]}],
 "routes": [{"prefix": "/hello", "app": "hello", "zone": "default"}]}
EOF
}

# haproxy_conf LB B1 B2 GLOBAL...: the same routing for HAProxy on port LB (round-robin,
# keep-alive to the servers, the same health checks); GLOBAL lines go in its `global` section.
# HAPROXY_ACCESS_LOG=1 logs each request (`option httplog`) to its standard output.
haproxy_conf() {
  local lb=$1 b1=$2 b2=$3; shift 3
  echo global
  for line in "$@"; do echo "  $line"; done
  [ -n "${HAPROXY_ACCESS_LOG:-}" ] && echo "  log stdout format raw local0"
  cat <<EOF
  maxconn 4096
defaults
  mode http${HAPROXY_ACCESS_LOG:+
  log global
  option httplog}
  timeout connect 1s
  timeout client 30s
  timeout server 60s
  timeout http-keep-alive 10s
  option forwardfor
  http-reuse safe
frontend web
  bind 127.0.0.1:$lb${HAPROXY_BIND_OPTS:+ $HAPROXY_BIND_OPTS}
  acl hello path /hello || path_beg /hello/
  use_backend apps if hello
backend apps
  balance roundrobin
  option httpchk GET /_paddock/health
  server s1 127.0.0.1:$b1 check inter 500 fall 2 rise 2
  server s2 127.0.0.1:$b2 check inter 500 fall 2 rise 2
EOF
}
