# Helpers shared by the benchmark scripts (sourced, not run).

. scripts/postgres.sh

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
