#!/usr/bin/env bash
# The scheduler service: tick start jitter (how long after its scheduled time each tick starts)
# with TIMERS timers every second on 3 front-ends, and the time to take over the tick of a
# server killed with SIGKILL during a long run (its lease is 10 s, renewed every 2 s).
#
#   bench/timers.sh                      # 100 timers, 30 s
#   TIMERS=20 DURATION=10 bench/timers.sh
#
# One controller (SQLite), three front-ends, all on this machine's cores, nothing pinned.
# Loopback only. Jitter is started_ms - tick_ms of every run, as journaled by the controller.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

TIMERS=${TIMERS:-100}
DURATION=${DURATION:-30}

bench_start

CP=$(port)
export PADDOCK_CONTROLLER="http://127.0.0.1:$CP"
RUST_LOG=warn "$PADDOCK" controller --listen "127.0.0.1:$CP" --db "sqlite://$work/paddock.db" \
  --data "$work/controller" 2>"$work/controller.log" &
for _ in $(seq 1 300); do [ -s "$work/controller/admin.token" ] && break; sleep 0.1; done
export PADDOCK_TOKEN; PADDOCK_TOKEN=$(cat "$work/controller/admin.token")
JOIN=$(cat "$work/controller/join.token")
for _ in $(seq 1 300); do "$PADDOCK" status >/dev/null 2>&1 && break; sleep 0.1; done
pids=()
for i in 1 2 3; do
  RUST_LOG=warn "$PADDOCK" frontend --controller "$PADDOCK_CONTROLLER" --join-token "$JOIN" \
    --listen "127.0.0.1:0" --name "fe$i" --data "$work/fe$i" 2>"$work/fe$i.log" &
  pids+=($!)
done
for _ in $(seq 1 300); do
  alive=$("$PADDOCK" status --json | python3 -c 'import json,sys; print(sum(s["alive"] for s in json.load(sys.stdin)["servers"]))')
  [ "$alive" = 3 ] && break; sleep 0.1
done

pkg="$work/many"; mkdir -p "$pkg"
cp fixtures/apps/packages/hello-v1/hello.wasm "$pkg/"
{
  echo 'name = "many"'; echo 'version = "v1"'; echo 'component = "hello.wasm"'
  for i in $(seq 1 "$TIMERS"); do
    printf '[[timer]]\nname = "t%d"\nevery = "1s"\npath = "/many/t%d"\n' "$i" "$i"
  done
  printf '[[timer]]\nname = "long"\nevery = "1h"\npath = "/many/long?sleep_ms=60000"\n'
} >"$pkg/paddock.toml"
"$PADDOCK" app publish "$pkg" >/dev/null
echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); $(date -u +%F)"
echo "$TIMERS timers every 1s on 3 front-ends for ${DURATION}s"
sleep "$DURATION"

python3 - "$TIMERS" <<'PY'
import json, os, statistics, sys, urllib.request
n = int(sys.argv[1])
base, token = os.environ["PADDOCK_CONTROLLER"], os.environ["PADDOCK_TOKEN"]
def get(path):
    req = urllib.request.Request(base + path, headers={"Authorization": "Bearer " + token})
    return json.load(urllib.request.urlopen(req))
jitter, servers, overlaps, gaps, runs_total = [], {}, 0, 0, 0
for i in range(1, n + 1):
    runs = sorted(get(f"/v1/timers/many/t{i}/runs?limit=10000"), key=lambda r: r["id"])
    runs_total += len(runs)
    for r in runs:
        jitter.append(r["started_ms"] - r["tick_ms"])
        servers[r["server"]] = servers.get(r["server"], 0) + 1
    for a, b in zip(runs, runs[1:]):
        if a["ended_ms"] is None or b["started_ms"] < a["ended_ms"]:
            overlaps += 1
        if b["tick_ms"] - a["tick_ms"] > 1000:
            gaps += 1
jitter.sort()
q = lambda p: jitter[min(len(jitter) - 1, int(p * len(jitter)))]
print(f"runs: {runs_total}, by server: {dict(sorted(servers.items()))}")
print(f"tick start jitter: p50 {q(0.5)} ms, p99 {q(0.99)} ms, max {jitter[-1]} ms")
print(f"overlapping runs: {overlaps}; ticks missing beyond one interval: {gaps}")
PY

# Takeover: start the long timer, kill the server running it, time the retry elsewhere.
"$PADDOCK" timer run many long >/dev/null
for _ in $(seq 1 100); do
  owner=$("$PADDOCK" timer runs many long --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r[0]["server"] if r else "")')
  [ -n "$owner" ] && break; sleep 0.05
done
killed_at=$(python3 -c 'import time; print(int(time.time()*1000))')
kill -KILL "${pids[${owner#fe} - 1]}"
for _ in $(seq 1 400); do
  retry=$("$PADDOCK" timer runs many long --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r[0]["started_ms"] if len(r) > 1 else "")')
  [ -n "$retry" ] && break; sleep 0.05
done
echo "takeover of a killed server's tick: $((retry - killed_at)) ms after SIGKILL (lease 10 s, renewed every 2 s)"
