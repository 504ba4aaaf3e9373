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

. scripts/postgres.sh
if [ -z "${PADDOCK_TEST_POSTGRES:-}" ]; then
  trap stop_postgres EXIT
  start_postgres off
  export PADDOCK_TEST_POSTGRES=$PG_URL
  echo "PostgreSQL for the tests: $PADDOCK_TEST_POSTGRES" >&2
fi

export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
[ $# -eq 0 ] && set -- --workspace
cargo test --locked "$@"
