#!/usr/bin/env bash
# Runs Paddock's whole test suite: unit tests of every crate, the store suite on SQLite and on
# PostgreSQL, and the end-to-end tests that start real `paddock` processes on loopback.
#
#   scripts/test.sh                  # everything
#   scripts/test.sh -p paddock-store # extra arguments go to `cargo test`
#
# PostgreSQL: with PADDOCK_TEST_POSTGRES=postgres://... set, that server is used. Otherwise the
# script installs Debian's `postgresql` package if needed, starts a throw-away cluster on a
# loopback port in a temporary folder, and removes it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ -z "${PADDOCK_TEST_POSTGRES:-}" ]; then
  pg_bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)" 2>/dev/null || true)
  if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
    echo "installing PostgreSQL (Debian package postgresql) for the store tests..." >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    pg_bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")
  fi
  pg_dir=$(mktemp -d /tmp/paddock-pg.XXXXXX)
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$pg_dir"
  pg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_postgres "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U paddock >/dev/null
  as_postgres "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
    -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
  stop_pg() {
    as_postgres "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  }
  trap stop_pg EXIT
  export PADDOCK_TEST_POSTGRES="postgres://paddock@127.0.0.1:$pg_port/postgres"
  echo "PostgreSQL for the tests: $PADDOCK_TEST_POSTGRES" >&2
fi

export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
[ $# -eq 0 ] && set -- --workspace
cargo test --locked "$@"
