#!/usr/bin/env bash
# The README's recipe "continue GPT-2 on your own text", run end to end on the built-in corpus, as a
# user would, in a fresh folder (default /tmp/continue-gpt2).
#
# A user fetches openai-community/gpt2 from the hub into models/gpt2. This machine has no hub, so the
# first stage makes a stand-in of GPT-2's layout: a small GPT-2 (4 layers, width 128, GPT-2's tokenizer)
# pretrained here on Tiny Shakespeare from ../shared/data and exported with `scalegpt export --format hf`,
# which writes the same GPT2LMHeadModel folder (config.json, model.safetensors, tokenizer). The second
# stage is the recipe itself, with CPU-sized overrides (fp32, a 128-token context, 200 steps).
#
# Usage: bench/continue_gpt2.sh [WORK_DIR]      (from the repository root, after `make install`)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/continue-gpt2}
SG="$ROOT/.venv/bin/scalegpt"
export SCALEGPT_DATA_ROOT=${SCALEGPT_DATA_ROOT:-$ROOT/../shared/data}
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
START=$(date +%s)

echo "== stage 1: a stand-in for the hub's gpt2 (pretrained on Tiny Shakespeare, exported to HF) =="
cat > standin.yaml <<'EOF'
defaults:
  data: shakespeare
model: {n_layer: 4, n_head: 4, d_model: 128, n_ctx: 256, vocab_size: 50257, attention: dense}
data: {dir: prepared/standin, tokenizer: gpt2}
run: {dir: runs/standin}
train: {max_steps: 200, micro_batch: 4, global_batch: 8, precision: fp32, device: cpu}
optim: {lr: 1.0e-3}
schedule: {warmup_tokens: 40960, decay_tokens: 409600}
checkpoint: {every: 200}
log: {every: 50}
eval: {every: 200, batches: 4}
EOF
"$SG" prepare standin.yaml
"$SG" launch standin.yaml --procs 2
"$SG" export runs/standin --format hf models/gpt2
ls models/gpt2

echo "== stage 2: the recipe =="
CPU=(train.precision=fp32 train.device=cpu model.n_ctx=128 train.max_steps=200 train.global_batch=16
  train.micro_batch=8 schedule.warmup_tokens=81920 schedule.decay_tokens=409600 eval.every=50 eval.batches=4
  checkpoint.every=100 log.every=25)
T2=$(date +%s)
"$SG" prepare continue-gpt2 "${CPU[@]}"
"$SG" launch continue-gpt2 --procs 2 "${CPU[@]}"
for model in runs/continue-gpt2 models/gpt2; do  # after the recipe, and the weights it started from
  echo "-- $model"
  "$SG" sample "$model" --prompt "The" --max-new-tokens 40 --temperature 0.8 --top-p 0.9 --seed 1
done
END=$(date +%s)
echo "stage 1: $((T2 - START)) s; stage 2 (the recipe): $((END - T2)) s"
