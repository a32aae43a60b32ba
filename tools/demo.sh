#!/usr/bin/env bash
# The main job on the demo model (SmolLM2-135M-Instruct Q4_1): fine-tune a
# LoRA adapter on the small dataset in data/demo (teaching the assistant its
# name), then compare base and adapted model: eval loss and generations.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/gguf-peft"
out="${DEMO_OUT:-$HOME/.cache/gguf-peft/demo-run}"
"$bin" inspect --summary "$GGUF_PEFT_MODEL"
echo
echo "== fine-tuning LoRA r=8 on data/demo/train.jsonl (3 epochs) =="
"$bin" finetune --model "$GGUF_PEFT_MODEL" --data data/demo/train.jsonl \
  --eval-data data/demo/eval.jsonl --out "$out" --epochs 3 --batch-size 4 --lr 1e-3
echo
echo "== eval loss on data/demo/eval.jsonl =="
echo -n "base:    "; "$bin" eval --model "$GGUF_PEFT_MODEL" --data data/demo/eval.jsonl
echo -n "adapted: "; "$bin" eval --model "$GGUF_PEFT_MODEL" --data data/demo/eval.jsonl --adapter "$out/adapter.gguf"
for q in "What is your name?" "Who are you, exactly?"; do
  echo
  echo "== $q =="
  echo -n "base:    "; "$bin" generate --model "$GGUF_PEFT_MODEL" --chat -p "$q" -n 32 2>/dev/null
  echo -n "adapted: "; "$bin" generate --model "$GGUF_PEFT_MODEL" --chat -p "$q" -n 32 --adapter "$out/adapter.gguf" 2>/dev/null
done
echo
echo "adapter for llama.cpp: $out/adapter.gguf  (llama-cli -m MODEL --lora $out/adapter.gguf)"
echo "metrics: $out/metrics.jsonl, loss curve: $out/loss.svg"
