#!/usr/bin/env bash
# Antidote's frontier on the SmolLM2 shared-data setting (issue 10's measurements), through the CLI stages:
# alignment on the refusal pairs, a poisoned fine-tune at p=0.2 on the task, then the frontier at six ratios
# (one scoring pass) evaluated on AdvBench probe prompts (rows 100-139, disjoint from the lab's evaluation
# prompts 0-49) and 100 validation rows the fine-tune never saw, with the random and benign-calibrated
# controls, for both LoRA factors (the authors'), lora_A only and the refusal score on lora_A (with its
# benign-calibrated control); then the same three frontiers on a poison-free
# fine-tune (p=0, the same number of task rows), which shows how much of the harm the task alone causes.
# CPU, 2 cores: about 45 minutes a task on a quiet machine. Run from the repository root with ../shared/data
# beside it:
#   bash examples/smollm2-frontier.sh [OUT] [sst2|agnews]
# POISON="0.2" (or "0") runs one of the two fine-tunes, so two shells can share the work once aligned/ exists.
set -euo pipefail
A=${ANTIDOTE:-antidote}
S=${SHARED:-../shared/data}
E=${1:-runs/smollm2-frontier}
TASK=${2:-sst2}
export HF_HUB_OFFLINE=1
case $TASK in
  # training rows first, validation rows 1000-1099 after them
  sst2) TRAIN="$S/tasks/sst2_train.tsv"; TASK_DATA=(--task-data "$TRAIN"); VALIDATION=(--validation-data "$S/tasks/sst2_train.tsv"
        --validation-skip 1000) ;;
  # validation rows from the test file, after the paper's 1000 evaluation rows
  # the cpu preset's 96 tokens hold few AG News prompts (median 129 tokens with SmolLM2's tokenizer)
  agnews) TRAIN="$S/tasks/agnews_train.json"; TASK_DATA=(--task-data "$TRAIN" --max-length 256)
          VALIDATION=(--validation-data "$S/tasks/agnews_test.json" --validation-skip 1000) ;;
  *) echo "task must be sst2 or agnews, got $TASK" >&2; exit 2 ;;
esac
[ -d "$E/aligned" ] || $A align --model smollm2-135m-instruct --dtype float32 --device cpu \
  --data "$S/safety/refusals_adv_training.csv" --prompt-field Behavior --response-field Safe_Response \
  --benign-data "$S/tasks/alpaca_demo.json" --benign-samples 40 --preset cpu --out "$E/aligned" --quiet
for P in ${POISON:-0.2 0}; do
  F="$E/$TASK-p$P"
  [ -d "$F/finetuned" ] || $A finetune --model "$E/aligned/merged" --dtype float32 --device cpu --task "$TASK" \
    "${TASK_DATA[@]}" --harmful-data "$S/harmful/beavertails_unsafe_pairs.json" \
    --harmful-fraction "$P" --samples-total 250 --preset cpu --out "$F/finetuned" --quiet
  COMMON=(--model "$E/aligned/merged" --adapter "$F/finetuned/adapter" --dtype float32 --device cpu
    --max-length 256 --ratio 0.005,0.01,0.02,0.05,0.1,0.2
    --probe-prompts "$S/harmful/advbench_behaviors.csv" --probe-field Behavior --probe-skip 100 --probe-samples 40
    --task "$TASK" "${VALIDATION[@]}" --validation-samples 100 --max-new-tokens 32 --task-prompt training --quiet)
  HARMFUL=(--data "$S/harmful/beavertails_unsafe_pairs.json" --skip 100 --samples 64)  # disjoint from the poison
  # the refusal score: the alignment's refusals against the user's own rows (the first 64 task rows it trained on)
  REFUSAL=(--score refusal --data "$S/safety/refusals_adv_training.csv" --prompt-field Behavior
    --response-field Safe_Response --samples 64 --contrast-data "$TRAIN" --contrast-samples 64)
  CONTROLS=() BENIGN=()
  [ "$P" = 0 ] || { CONTROLS=(--controls random,benign --benign-data "$S/tasks/alpaca_demo.json" --benign-samples 64)
                    BENIGN=(--controls benign --benign-data "$S/tasks/alpaca_demo.json" --benign-samples 64); }
  [ -d "$F/frontier-adapter" ] || $A realign "${COMMON[@]}" "${HARMFUL[@]}" --targets adapter "${CONTROLS[@]}" \
    --out "$F/frontier-adapter"
  [ -d "$F/frontier-adapter-a" ] || $A realign "${COMMON[@]}" "${HARMFUL[@]}" --targets adapter-a --out "$F/frontier-adapter-a"
  [ -d "$F/frontier-refusal-a" ] || $A realign "${COMMON[@]}" "${REFUSAL[@]}" --targets adapter-a "${BENIGN[@]}" \
    --out "$F/frontier-refusal-a"
done
echo "frontiers: $E/$TASK-p*/frontier-*/frontier.csv"
