#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine: installs what the ggml build
# needs (cmake, libclang-dev, g++) if missing and fetches the demo model.
# Sourced by tools/demo.sh and tools/test.sh; safe to run repeatedly.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >&2
fi
command -v cargo >/dev/null 2>&1 || { echo "error: cargo not found; install Rust (rustup) first" >&2; exit 1; }
# Keep the (slow, ~7 min) ggml build outside the checkout so it is reused.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gguf-peft-target}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GGUF_PEFT_MODEL="${GGUF_PEFT_MODEL:-$("$here/fetch-model.sh")}"
export GGUF_PEFT_MODEL
