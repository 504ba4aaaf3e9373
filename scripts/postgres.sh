# A throw-away PostgreSQL cluster for the tests and benchmarks (sourced, not run).
#
#   start_postgres on|off   # fsync on (benchmarks) or off (tests); sets PG_URL and PG_DIR
#   stop_postgres           # stops it and removes its folder
#
# Debian's `postgresql` package is installed if missing. The cluster listens on a free loopback
# port, in a temporary folder, trusting local connections of the user `paddock`.

# Set by start_postgres only: whatever the caller's environment holds is not ours to remove.
PG_DIR=
PG_URL=
pg_bin=

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
  local fsync=$1
  pg_bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)" 2>/dev/null || true)
  if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
    echo "installing PostgreSQL (Debian package postgresql)..." >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    pg_bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")
  fi
  PG_DIR=$(mktemp -d /tmp/paddock-pg.XXXXXX)
  # From here on stop_postgres removes it, even if the start fails halfway.
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DIR"
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_postgres "$pg_bin/initdb" -D "$PG_DIR/data" -A trust -U paddock >/dev/null
  as_postgres "$pg_bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
    -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=$fsync" start >/dev/null
  PG_URL="postgres://paddock@127.0.0.1:$port/postgres"
}

stop_postgres() {
  [ -n "${PG_DIR:-}" ] || return 0
  as_postgres "${pg_bin:?}/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
  PG_DIR=
}
