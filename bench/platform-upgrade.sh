#!/usr/bin/env bash
# How long a balanced platform upgrade takes, whole and step by step, and what users see
# meanwhile. A controller, N front-ends and a balancer run from their own copies of the release
# `paddock` (as each machine of a farm has its own); each round installs a new build — the same
# executable with a few bytes appended, so its sha256 differs and every server must download,
# install and restart on it — with `paddock upgrade` while `wrk` keeps CONNECTIONS keep-alive
# connections busy on the balancer. The operation's journal gives each step's time.
#
#   bench/platform-upgrade.sh                    # 2 and 4 front-ends, 3 rounds each
#   FRONTENDS=2 ROUNDS=1 bench/platform-upgrade.sh
#   SHOW=1 bench/platform-upgrade.sh             # also what `paddock upgrade` printed
#
# Everything on this machine's cores, nothing pinned; the balancer has one thread, wrk one.
# Loopback only. There is no peer to compare with: the figures are the cost of the procedure.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

FRONTENDS=${FRONTENDS:-2 4}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-8}

need wrk wrk
bench_start

size=$(stat -c %s "$PADDOCK")
echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); $(date -u +%F)"
echo "build: target/release/paddock, $((size / 1000000)) MB"
echo "load: wrk -t1 -c$CONNECTIONS on the balancer (GET /hello) during every round"
echo

for n in $FRONTENDS; do
  dir="$work/farm-$n"; mkdir -p "$dir/bin"
  # One executable per process, as on separate machines.
  copy() { mkdir -p "$dir/bin/$1"; cp "$PADDOCK" "$dir/bin/$1/paddock"; echo "$dir/bin/$1/paddock"; }
  CP=$(port); LB=$(port); LB_ADMIN=$((LB + 1))
  export PADDOCK_CONTROLLER="http://127.0.0.1:$CP"
  RUST_LOG=warn "$(copy controller)" controller --listen "127.0.0.1:$CP" \
    --db "sqlite://$dir/paddock.db" --data "$dir/controller" --platform-upgrades \
    >/dev/null 2>"$dir/controller.log" &
  for _ in $(seq 1 300); do [ -s "$dir/controller/admin.token" ] && break; sleep 0.1; done
  export PADDOCK_TOKEN; PADDOCK_TOKEN=$(cat "$dir/controller/admin.token")
  for _ in $(seq 1 300); do "$PADDOCK" status >/dev/null 2>&1 && break; sleep 0.1; done
  JOIN=$(cat "$dir/controller/join.token")
  for i in $(seq 1 "$n"); do
    RUST_LOG=warn "$(copy "fe$i")" frontend --controller "$PADDOCK_CONTROLLER" --join-token "$JOIN" \
      --listen "127.0.0.1:0" --name "fe$i" --data "$dir/fe$i" 2>"$dir/fe$i.log" &
  done
  RUST_LOG=warn "$PADDOCK" balancer --controller "$PADDOCK_CONTROLLER" --join-token "$JOIN" \
    --listen "127.0.0.1:$LB" --admin "127.0.0.1:$LB_ADMIN" --name lb1 --threads 1 \
    --data "$dir/lb1" 2>"$dir/lb1.log" &
  for _ in $(seq 1 300); do
    alive=$("$PADDOCK" status --json 2>/dev/null | python3 -c 'import json,sys; print(sum(s["alive"] for s in json.load(sys.stdin)["servers"]))' || echo 0)
    [ "$alive" = "$n" ] && break; sleep 0.1
  done
  "$PADDOCK" app publish fixtures/apps/packages/hello-v1 >/dev/null
  wait_http "http://127.0.0.1:$LB/hello"

  wrk -t1 -c"$CONNECTIONS" -d600s "http://127.0.0.1:$LB/hello" >"$dir/wrk.out" 2>&1 &
  wrk_pid=$!
  sleep 1
  for round in $(seq 1 "$ROUNDS"); do
    cp "$PADDOCK" "$dir/new-$round"
    printf '\n-- platform upgrade benchmark, round %s --\n' "$round" >>"$dir/new-$round"
    "$PADDOCK" upgrade "$dir/new-$round" >"$dir/upgrade-$round.out"
    id=$("$PADDOCK" op list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
    "$PADDOCK" op show "$id" --json >"$dir/op-$round.json"
    sleep 1
  done
  kill -INT "$wrk_pid"; wait "$wrk_pid" 2>/dev/null || true
  errors=$(awk '/Non-2xx|Socket errors/ {print}' "$dir/wrk.out" | tr '\n' ' ')
  requests=$(awk '/requests in/ {print $1}' "$dir/wrk.out")

  python3 - "$n" "$dir" "$ROUNDS" <<'EOF'
import json, sys, statistics
n, d, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
ops = [json.load(open(f"{d}/op-{r}.json")) for r in range(1, rounds + 1)]
totals = [op["ended_ms"] - op["created_ms"] for op in ops]
steps = {}
for op in ops:
    assert op["state"] == "succeeded", op
    for s in op["steps"]:
        steps.setdefault(s["step"], []).append(s["ended_ms"] - s["started_ms"])
median = statistics.median(totals)
print(f"{n} front-ends: whole operation median {median:.0f} ms (rounds: {', '.join(str(t) for t in totals)} ms)")
for name, ms in steps.items():
    m = statistics.median(ms)
    print(f"    {name:<22} {m:>6.0f} ms  {100 * m / median:5.1f} %")
EOF
  echo "    wrk: $requests requests during the rounds; ${errors:-no non-2xx responses, no socket errors}"
  if [ -n "${SHOW:-}" ]; then echo "    what \`paddock upgrade\` printed in round 1:"; sed 's/^/    | /' "$dir/upgrade-1.out"; fi
  echo
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
done
