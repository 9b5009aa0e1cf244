#!/usr/bin/env bash
# The demo behind `make demo-chat`: an instruct model (the bundled SmolLM2-135M-Instruct)
# must answer support messages with one line of JSON. Its system prompt alone does not get it
# there; a soft prompt placed before the user turn, trained on 160 conversations, does.
# Prints each step's elapsed time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo-support}
MODEL=${MODEL:-embedded-chat}
SYSTEM='Reply with one line of JSON and nothing else: {"topic": T, "sentiment": S} where T is one of battery, screen, delivery, price, support and S is positive or negative.'
EVAL=(--model "$MODEL" --data examples/support/test.jsonl --generate --max-new-tokens 24)
start=$(date +%s)
step() { echo; echo "== $1 (at $(( $(date +%s) - start )) s)"; }

step "1. The instruct model with a system prompt describing the task (the baseline)"
softprompt eval "${EVAL[@]}" --system "$SYSTEM" --output "$OUT-system"

step "2. The same with 4 solved examples as earlier turns (few-shot)"
softprompt eval "${EVAL[@]}" --system "$SYSTEM" --shots 4 \
  --shots-data examples/support/train.jsonl --output "$OUT-fewshot"

step "3. Train a 20-token soft prompt before the user turn (the model stays frozen)"
softprompt train --model "$MODEL" \
  --data examples/support/train.jsonl --validation examples/support/validation.jsonl \
  --system "$SYSTEM" --prompt-position before-user \
  --epochs 3 --eval-every 20 --output "$OUT" --overwrite

step "4. The tuned prompt, scored on the same test conversations"
softprompt eval --prompt "$OUT" "${EVAL[@]:2}" --output "$OUT-tuned"

step "5. Side by side on a few test messages"
softprompt generate --prompt "$OUT" --compare --file examples/support/test.jsonl --limit 4 \
  --max-new-tokens 24

echo
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("== Test set (50 conversations): exact match, valid JSON, loss on the answer")
for name, folder in [("system prompt", "-system"), ("few-shot, k=4", "-fewshot"), ("tuned prompt", "-tuned")]:
    m = json.load(open(f"{out}{folder}/results.json"))["metrics"]
    print(f"   {name:<14}: exact {m['exact_match']:.2f}  valid JSON {m.get('json_valid', 0):.2f}  loss {m['loss']:.3f}")
PY
echo "   total demo time: $(( $(date +%s) - start )) s"
