#!/usr/bin/env bash
# The whole test suite: set up, build, run every test (release profile, so
# the numerics run at full speed and share the build with the binary).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo build --release --quiet
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release -- --test-threads 1 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over all test binaries.
awk '/^test result:/ { p += $4; f += $6 } END { printf "all tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
