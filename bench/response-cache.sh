#!/usr/bin/env bash
# The front-end's response cache, side by side with the usual alternative: nginx's proxy_cache
# in front of a front-end whose own cache is off. The `counter` app's `/counter/note?key=k` (one
# read of the farm's database, `Cache-Control: public, max-age=60`), loaded by the same wrk, in
# the same run, alternating rounds:
#
#   paddock     `paddock frontend` with its cache (the default): every request after the first
#               is a hit
#   nginx       nginx (one worker, proxy_cache, keep-alive to the front-end) in front of
#               `paddock frontend --cache-mib 0`: every request after the first is nginx's hit
#   no cache    `paddock frontend --cache-mib 0` alone: every request runs the app (what the
#               cache saves)
#
#   bench/response-cache.sh                  # 3 rounds of 10 s per side
#   ROUNDS=1 DURATION=5s bench/response-cache.sh
#
# CPUs: the serving side on CPU 1 (the front-end's threads, and nginx with its front-end), wrk
# (one thread, CONNECTIONS connections) on CPU 0. SQLite for the app's data. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
TARGET='/counter/note?key=k'

need wrk wrk
need nginx nginx-light
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
bench_start
mkdir -p "$work/apps/counter"
cp fixtures/apps/packages/counter-v1/* "$work/apps/counter/"

echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); $(date -u +%F)"
echo "wrk -t1 -c$CONNECTIONS -d$DURATION on CPU 0; the serving side on CPU 1; $ROUNDS rounds"

# frontend NAME CACHE_MIB: starts one on CPU 1, its port in FE_PORT
frontend() {
  local name=$1 mib=$2
  FE_PORT=$(port)
  RUST_LOG=warn taskset -c 1 "$PADDOCK" frontend --apps "$work/apps" \
    --db "sqlite://$work/apps.db" --listen "127.0.0.1:$FE_PORT" --name "$name" \
    --data "$work/fe-$name" --cache-mib "$mib" >"$work/fe-$name.log" 2>&1 &
  wait_http "http://127.0.0.1:$FE_PORT/counter/"
}

# nginx_in_front UPSTREAM_PORT: starts it on CPU 1, its port in NGINX_PORT
nginx_in_front() {
  local up=$1 np
  np=$(port)
  NGINX_PORT=$np
  mkdir -p "$work/nginx/cache"
  # The worker runs as this script's user, so that it may write its cache in the work folder.
  cat >"$work/nginx/nginx.conf" <<EOF
user $(id -un);
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  client_body_temp_path $work/nginx;
  proxy_temp_path $work/nginx/tmp;
  proxy_cache_path $work/nginx/cache levels=1:2 keys_zone=paddock:10m max_size=64m inactive=10m use_temp_path=off;
  open_file_cache max=1000 inactive=60s;
  upstream fe { server 127.0.0.1:$up; keepalive 32; }
  server {
    listen 127.0.0.1:$np;
    location / {
      proxy_pass http://fe;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_cache paddock;
      add_header X-Cache \$upstream_cache_status;
    }
  }
}
EOF
  taskset -c 1 "$NGINX" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>>"$work/nginx/error.log" &
  wait_http "http://127.0.0.1:$np/counter/"
}

frontend cached 64
PADDOCK_PORT=$FE_PORT
curl -sf -o /dev/null "http://127.0.0.1:$PADDOCK_PORT/counter/put?key=k&value=v"
frontend behind 0
nginx_in_front "$FE_PORT"
frontend plain 0
PLAIN_PORT=$FE_PORT

# Both caches answer: the second request is a hit on each.
for url in "http://127.0.0.1:$PADDOCK_PORT$TARGET" "http://127.0.0.1:$NGINX_PORT$TARGET"; do
  curl -sf -o /dev/null "$url" || { echo "no answer at $url" >&2; cat "$work/nginx/error.log" >&2; exit 1; }
done
curl -sf -D - -o /dev/null "http://127.0.0.1:$PADDOCK_PORT$TARGET" | grep -qi '^x-paddock-cache: hit' ||
  { echo "the front-end's cache does not answer" >&2; exit 1; }
curl -sf -D - -o /dev/null "http://127.0.0.1:$NGINX_PORT$TARGET" | grep -qi '^x-cache: HIT' ||
  { echo "nginx's cache does not answer" >&2; exit 1; }

# run SIDE PORT -> "rps p50_ms p99_ms"
run() {
  local out
  out=$(taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "http://127.0.0.1:$2$TARGET")
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
    echo "$1 answered errors:" >&2; echo "$out" >&2; exit 1
  fi
  echo "$(awk '/^Requests\/sec/ {print $2}' <<<"$out") \
$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")") \
$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")"
}

declare -A RPS P50 P99
for round in $(seq 1 "$ROUNDS"); do
  for side in paddock nginx plain; do
    case $side in paddock) p=$PADDOCK_PORT ;; nginx) p=$NGINX_PORT ;; plain) p=$PLAIN_PORT ;; esac
    read -r rps p50 p99 <<<"$(run "$side" "$p")"
    RPS[$side]+="$rps "; P50[$side]+="$p50 "; P99[$side]+="$p99 "
    printf 'round %d %-8s %10.0f req/s  p50 %s ms  p99 %s ms\n' "$round" "$side" "$rps" "$p50" "$p99"
  done
done

printf '\n%-34s %12s %10s %10s\n' "side (median of $ROUNDS)" "req/s" "p50 ms" "p99 ms"
for side in paddock nginx plain; do
  case $side in
    paddock) label="paddock frontend, its cache" ;;
    nginx) label="nginx proxy_cache in front" ;;
    plain) label="paddock frontend, no cache" ;;
  esac
  printf '%-34s %12.0f %10s %10s\n' "$label" "$(median "${RPS[$side]}")" \
    "$(median "${P50[$side]}")" "$(median "${P99[$side]}")"
done
awk -v a="$(median "${RPS[paddock]}")" -v b="$(median "${RPS[nginx]}")" \
  -v c="$(median "${P99[paddock]}")" -v d="$(median "${P99[nginx]}")" \
  -v e="$(median "${RPS[plain]}")" 'BEGIN {
    printf "\nPaddock / nginx: throughput %.2fx, p99 %.2fx; cache / no cache: throughput %.2fx\n",
      a / b, c / d, a / e }'
