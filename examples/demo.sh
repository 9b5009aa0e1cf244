#!/usr/bin/env bash
# The demo behind `make demo`: train a soft prompt for sentiment on the embedded
# Gemma 3 270M (offline), then show base vs tuned answers on held-out reviews.
# Each step prints when it started; the last line, the whole time (README, "Results").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo-sentiment}
start=$(date +%s)
at() { echo "   (at $(( $(date +%s) - start )) s)"; }

echo "== 1. Train a 20-token soft prompt (the 270M base model stays frozen)"
softprompt train \
  --data examples/sentiment/train.jsonl \
  --validation examples/sentiment/validation.jsonl \
  --input-field review --target-field label \
  --template 'Review: {input}\nSentiment:' \
  --epochs 3 --eval-every 16 \
  --output "$OUT" --overwrite

echo
echo "== 2. Base model vs tuned prompt on held-out test reviews (same template, greedy)"; at
softprompt generate --prompt "$OUT" --compare \
  --file examples/sentiment/test.jsonl --limit 8 --max-new-tokens 8

echo
python - "$OUT" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/softprompt.json"))["metrics"]
print("== 3. Validation loss (nats per target token)")
print(f"   base model, no prompt : {m['base_val_loss']:.4f}")
print(f"   initial prompt        : {m['initial_val_loss']:.4f}")
print(f"   tuned prompt (best)   : {m['best_val_loss']:.4f}  (step {m['best_step']})")
print(f"   training time         : {m['train_seconds']:.0f} s for {m['steps']} steps")
PY
echo "   artifact              : $OUT ($(du -sh "$OUT/adapter_model.safetensors" | cut -f1) prompt; loss curve in $OUT/loss.png)"
echo "   total demo time       : $(( $(date +%s) - start )) s"
