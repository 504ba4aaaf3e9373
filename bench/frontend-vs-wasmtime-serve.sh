#!/usr/bin/env bash
# Side-by-side benchmark: the same `hello` component served by `wasmtime serve` (wasmtime-cli of
# the same wasmtime version as Paddock's runtime) and by `paddock frontend`, loaded by the same
# `wrk`, in the same run, alternating rounds. Prints throughput and p99 of each and their ratios.
#
#   bench/frontend-vs-wasmtime-serve.sh            # 3 rounds of 10 s per side and per CPU setup
#   ROUNDS=1 DURATION=5s bench/frontend-vs-wasmtime-serve.sh
#
# CPU setups: "1 core": each server pinned to CPU 1 and wrk to CPU 0; "2 cores": nothing pinned,
# server and wrk share both CPUs. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

WASMTIME_VERSION=48.0.8
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
TOOLS=${TOOLS:-$PWD/bench/.tools}
COMPONENT=fixtures/apps/packages/hello-v1/hello.wasm

need wrk wrk
if ! "$TOOLS/bin/wasmtime" --version 2>/dev/null | grep -q "$WASMTIME_VERSION"; then
  echo "installing wasmtime-cli $WASMTIME_VERSION into $TOOLS (about 20 minutes on 2 cores)..." >&2
  cargo install --quiet --locked --root "$TOOLS" "wasmtime-cli@$WASMTIME_VERSION"
fi
bench_start
mkdir -p "$work/apps/hello"
cp fixtures/apps/packages/hello-v1/* "$work/apps/hello/"
# Same route for both: wasmtime serve sends every path to the component.
PATH_UNDER_TEST=/hello/

# run_wrk PINNING URL -> "requests_per_sec p99_ms"
run_wrk() {
  local pin=$1 url=$2 out
  if [ "$pin" = 1 ]; then
    out=$(taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$url")
  else
    out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "$url")
  fi
  local rps p99
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  echo "$rps $(to_ms "$p99")"
}

start_server() { # kind pinning port
  local kind=$1 pin=$2 port=$3 prefix=()
  [ "$pin" = 1 ] && prefix=(taskset -c 1)
  case $kind in
    paddock)
      RUST_LOG=warn "${prefix[@]}" "$PADDOCK" frontend --listen "127.0.0.1:$port" --name bench \
        --apps "$work/apps" --data "$work/data" >"$work/paddock.log" 2>&1 &
      ;;
    wasmtime)
      "${prefix[@]}" "$TOOLS/bin/wasmtime" serve -Scli --addr "127.0.0.1:$port" "$COMPONENT" \
        >"$work/wasmtime.log" 2>&1 &
      ;;
  esac
  echo $!
}

declare -A RPS P99 N
for pin in 1 2; do
  for round in $(seq 1 "$ROUNDS"); do
    for kind in wasmtime paddock; do
      port=$((18500 + RANDOM % 1000))
      pid=$(start_server "$kind" "$pin" "$port")
      wait_http "http://127.0.0.1:$port$PATH_UNDER_TEST"
      # warm-up, then the measured run
      wrk -t1 -c4 -d1s "http://127.0.0.1:$port$PATH_UNDER_TEST" >/dev/null
      read -r rps p99 < <(run_wrk "$pin" "http://127.0.0.1:$port$PATH_UNDER_TEST")
      kill "$pid"; wait "$pid" 2>/dev/null || true
      printf '%-8s %s core(s) round %s: %10.0f req/s  p99 %8.3f ms\n' "$kind" "$pin" "$round" "$rps" "$p99"
      key="$kind-$pin"
      RPS[$key]=$(awk -v a="${RPS[$key]:-0}" -v b="$rps" 'BEGIN {print a + b}')
      P99[$key]=$(awk -v a="${P99[$key]:-0}" -v b="$p99" 'BEGIN {print a + b}')
      N[$key]=$(( ${N[$key]:-0} + 1 ))
    done
  done
done

echo
echo "machine: $(nproc) cores, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//'); $(date -u +%Y-%m-%d)"
echo "load: wrk, $CONNECTIONS keep-alive connections, $DURATION per run, $ROUNDS rounds per side, alternating"
printf '%-8s %-10s %12s %10s\n' setup server "req/s" "p99 ms"
for pin in 1 2; do
  for kind in wasmtime paddock; do
    key="$kind-$pin"
    printf '%-8s %-10s %12.0f %10.3f\n' "$pin core" "$kind" \
      "$(awk -v a="${RPS[$key]}" -v n="${N[$key]}" 'BEGIN {print a / n}')" \
      "$(awk -v a="${P99[$key]}" -v n="${N[$key]}" 'BEGIN {print a / n}')"
  done
  awk -v pr="${RPS[paddock-$pin]}" -v wr="${RPS[wasmtime-$pin]}" -v pp="${P99[paddock-$pin]}" -v wp="${P99[wasmtime-$pin]}" -v pin="$pin" \
    'BEGIN { printf "%s core ratios: throughput paddock/wasmtime = %.2fx (goal >= 1.00), p99 paddock/wasmtime = %.2fx (goal <= 1.10)\n", pin, pr / wr, pp / wp }'
done
