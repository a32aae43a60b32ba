#!/usr/bin/env bash
# The main job on the demo model (SmolLM2-135M-Instruct Q4_1): set up, build,
# inspect the model, and generate with our own graph.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/gguf-peft"
"$bin" inspect --summary "$GGUF_PEFT_MODEL"
echo
echo '$ gguf-peft generate --chat -p "Give three tips for staying healthy." -n 64'
"$bin" generate --model "$GGUF_PEFT_MODEL" --chat -p "Give three tips for staying healthy." -n 64
