#!/usr/bin/env bash
# App data (wasi:keyvalue) on a front-end: what a request that reads or writes the farm's
# database costs, next to one that does not. The `counter` app on one front-end of its own
# (`--apps`, `--db`), loaded by wrk for DURATION per path:
#
#   /counter/                      no data (the baseline)
#   /counter/get?key=k             one read of a bucket
#   /counter/put?key=k&value=v     one write (an upsert)
#   /counter/hits                  one atomic increment (a transaction)
#   /counter/visit + cookie        a session: found (a read; extended only now and then), then
#                                  an increment in it
#
#   bench/app-data.sh                 # SQLite (WAL, synchronous=FULL), then PostgreSQL
#
# PostgreSQL is a throw-away cluster on loopback (Debian's package, fsync on, default settings),
# or the server at PADDOCK_BENCH_POSTGRES.
#
# Nothing pinned: the front-end, wrk (2 threads, CONNECTIONS connections) and the database share
# this machine's cores. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-16}

need wrk wrk
bench_start
mkdir -p "$work/apps/counter"
cp fixtures/apps/packages/counter-v1/* "$work/apps/counter/"

echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); $(date -u +%F)"
echo "wrk -t2 -c$CONNECTIONS -d$DURATION per path, nothing pinned"

# measure NAME DB_URL
measure() {
  local name=$1 db=$2 fp pid out session
  fp=$(port)
  RUST_LOG=warn "$PADDOCK" frontend --apps "$work/apps" --db "$db" --listen "127.0.0.1:$fp" \
    --name bench --data "$work/fe-$name" 2>"$work/fe-$name.log" &
  pid=$!
  wait_http "http://127.0.0.1:$fp/counter/"
  curl -sf -o /dev/null "http://127.0.0.1:$fp/counter/put?key=k&value=v"
  session=$(curl -sf -D - -o /dev/null "http://127.0.0.1:$fp/counter/visit" |
    awk -F'[=;]' 'tolower($1) ~ /^set-cookie: paddock_session_counter/ {print $2}')
  [ -n "$session" ] || { echo "no session cookie from the counter app" >&2; exit 1; }
  printf '\n%s\n%-28s %12s %10s %10s\n' "$name" "path" "requests/s" "p50 ms" "p99 ms"
  for path in "/counter/" "/counter/get?key=k" "/counter/put?key=k&value=v" "/counter/hits" \
    "/counter/visit"; do
    local header=()
    [ "$path" = /counter/visit ] && header=(-H "Cookie: paddock_session_counter=$session")
    out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "${header[@]}" "http://127.0.0.1:$fp$path")
    if grep -q "Non-2xx" <<<"$out"; then
      echo "$path answered errors:" >&2; echo "$out" >&2; exit 1
    fi
    printf '%-28s %12.0f %10s %10s\n' "$path" \
      "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
      "$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")" \
      "$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

measure sqlite "sqlite://$work/apps.db"
if [ -z "${PADDOCK_BENCH_POSTGRES:-}" ]; then
  if [ "$(id -u)" != 0 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "PostgreSQL skipped: not installed, and installing it needs root (or set PADDOCK_BENCH_POSTGRES)" >&2
    exit 0
  fi
  start_postgres on
  PADDOCK_BENCH_POSTGRES=$PG_URL
fi
measure postgres "$PADDOCK_BENCH_POSTGRES"
