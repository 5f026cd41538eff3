#!/usr/bin/env bash
# Antidote's frontier on the SmolLM2 shared-data setting (issue 10's measurements), through the CLI stages:
# alignment on the refusal pairs, a poisoned fine-tune at p=0.2 on SST-2, then the frontier at six ratios
# (one scoring pass) evaluated on AdvBench probe prompts (rows 100-139, disjoint from the lab's evaluation
# prompts 0-49) and SST-2 validation rows (1000-1099, after the fine-tuning's), with the random and
# benign-calibrated controls, for both LoRA factors (the authors') and lora_A only. CPU, 2 cores: about
# 30 minutes on a quiet machine. Run from the repository root with ../shared/data beside it:
#   bash examples/smollm2-frontier.sh [OUT]
set -euo pipefail
A=${ANTIDOTE:-antidote}
S=${SHARED:-../shared/data}
E=${1:-runs/smollm2-frontier}
export HF_HUB_OFFLINE=1
[ -d "$E/aligned" ] || $A align --model smollm2-135m-instruct --dtype float32 --device cpu \
  --data "$S/safety/refusals_adv_training.csv" --prompt-field Behavior --response-field Safe_Response \
  --benign-data "$S/tasks/alpaca_demo.json" --benign-samples 40 --preset cpu --out "$E/aligned" --quiet
[ -d "$E/finetuned" ] || $A finetune --model "$E/aligned/merged" --dtype float32 --device cpu --task sst2 \
  --task-data "$S/tasks/sst2_train.tsv" --harmful-data "$S/harmful/beavertails_unsafe_pairs.json" \
  --harmful-fraction 0.2 --samples-total 250 --preset cpu --out "$E/finetuned" --quiet
COMMON=(--model "$E/aligned/merged" --adapter "$E/finetuned/adapter" --dtype float32 --device cpu
  --data "$S/harmful/beavertails_unsafe_pairs.json" --skip 100 --samples 64 --max-length 256
  --ratio 0.005,0.01,0.02,0.05,0.1,0.2
  --probe-prompts "$S/harmful/advbench_behaviors.csv" --probe-field Behavior --probe-skip 100 --probe-samples 40
  --task sst2 --validation-data "$S/tasks/sst2_train.tsv" --validation-skip 1000 --validation-samples 100
  --max-new-tokens 32 --task-max-new-tokens 8 --task-prompt training --quiet)
[ -d "$E/frontier-adapter" ] || $A realign "${COMMON[@]}" --targets adapter --controls random,benign \
  --benign-data "$S/tasks/alpaca_demo.json" --benign-samples 64 --out "$E/frontier-adapter"
[ -d "$E/frontier-adapter-a" ] || $A realign "${COMMON[@]}" --targets adapter-a --out "$E/frontier-adapter-a"
echo "frontiers: $E/frontier-adapter/frontier.csv $E/frontier-adapter-a/frontier.csv"
