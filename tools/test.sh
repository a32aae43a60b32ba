#!/usr/bin/env bash
# The whole test suite: set up, build, run every test (release profile, so
# the numerics run at full speed and share the build with the binary).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo build --release --quiet
cargo test --release -- --test-threads 1
