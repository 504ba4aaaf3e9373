#!/usr/bin/env bash
# Runs Paddock's whole test suite: unit tests of every crate and the end-to-end tests that start
# real `paddock` processes on loopback. Installs what the tests need first.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -p paddock-core # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests use the committed test app components (fixtures/apps/packages); nothing
# else outside Cargo is needed yet.
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
cargo test --workspace --locked "$@"
