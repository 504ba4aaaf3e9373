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
#
# The console's tests drive headless Chromium through chromedriver: Debian's `chromium` and
# `chromium-driver` packages are installed if `chromedriver` is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromedriver >/dev/null; then
  echo "installing Chromium and ChromeDriver (Debian packages chromium, chromium-driver)..." >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi

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
