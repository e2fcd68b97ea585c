#!/usr/bin/env bash
# The GPU benchmark, run as one script on the H200 machine (see bench/README.md).
#   bash bench/run_gpu.sh [OUT_DIR] [PART]
# PART: core (sampler, SFT, GRPO), dpo, run2 (the second, budget-limited run), or all. Every figure goes to OUT_DIR/results.jsonl; the
# log to OUT_DIR/log.txt. Each measurement runs in its own process under a time limit, so one
# failure or hang does not stop the others.
set -u
OUT=${1:-bench/results/gpu-$(date +%F)}
PART=${2:-all}
mkdir -p "$OUT"
R="$OUT/results.jsonl"
B="python3 bench/bench.py"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
log() { echo "== $(date +%T) $*"; }
run() { log "$*"; timeout "$1" "${@:2}" 2>&1 | grep -E "RESULT|Error|error|Traceback" | cut -c1-1500; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$PART" = core ] || [ "$PART" = all ]; then
  run 150 $B sampler --size 0.5b --out "$R"
  run 150 $B run --impl prefcli --mode sft --size 0.5b --batch 8 --out "$R"
  run 150 $B run --impl trl --mode sft --size 0.5b --batch 8 --out "$R"
  run 150 $B run --impl prefcli --mode sft --size 0.5b --batch 32 --out "$R"
  run 150 $B run --impl prefcli --mode grpo --size 0.5b --batch 8 --prompts 1 --out "$R"
  run 200 $B run --impl trl --mode grpo --size 0.5b --batch 8 --steps 5 --warmup 2 --out "$R"
  run 150 $B run --impl prefcli --mode grpo --size 0.5b --batch 16 --prompts 8 --out "$R"
fi
if [ "$PART" = run2 ]; then
  # the second device run: compiled sampler, GRPO with it, DPO side by side, SFT with fewer syncs,
  # with gradient checkpointing (memory vs TRL) and with compile; most important first, and
  # nothing new starts after DEADLINE seconds so the call ends inside its device budget
  DEADLINE=${DEADLINE:-290}
  t0=$(date +%s)
  left() { [ $(( $(date +%s) - t0 )) -lt "$DEADLINE" ]; }
  left && run 110 $B sampler --size 0.5b --out "$R"
  left && run 70 $B run --impl prefcli --mode grpo --size 0.5b --batch 8 --prompts 1 --steps 8 --out "$R"
  left && run 60 $B run --impl prefcli --mode dpo --size 0.5b --batch 8 --steps 8 --out "$R"
  left && run 80 $B run --impl trl --mode dpo --size 0.5b --batch 8 --steps 8 --warmup 2 --out "$R"
  left && run 50 $B run --impl prefcli --mode sft --size 0.5b --batch 8 --steps 8 --out "$R"
  left && run 50 $B run --impl prefcli --mode sft --size 0.5b --batch 8 --steps 8 --grad-ckpt --out "$R"
  left && run 90 $B run --impl prefcli --mode sft --size 0.5b --batch 8 --steps 8 --compile --out "$R"
fi
if [ "$PART" = dpo ] || [ "$PART" = all ]; then
  run 150 $B run --impl prefcli --mode dpo --size 0.5b --batch 8 --out "$R"
  run 150 $B run --impl trl --mode dpo --size 0.5b --batch 8 --out "$R"
fi
log done
