#!/usr/bin/env bash
# Issue 10's selections side by side on one GPU, on held-back data: SmolLM2-135M aligned on the refusal pairs,
# fine-tuned with LoRA on SST-2 and AG News at p=0.2 (and p=0), then every selection's frontier at the same
# ratios on the same fine-tuned model. Harmful score on AdvBench rows 200-439 (disjoint from the lab's rows
# 0-49 and the probe rows 100-139), fine-tune accuracy on the task's test rows (SST-2 dev, AG News test 0-499).
# Selections: the authors' (both LoRA factors), lora_A only, per-matrix rounding, and the refusal score (the
# first-order gain of the refusal answers' likelihood, with and without the user's own rows); controls: random and
# benign-calibrated.
# The frontiers run in parallel (JOBS at a time); a 135M model leaves the GPU mostly idle otherwise.
#   bash examples/gpu/smollm2-selections.sh [OUT]        (SHARED=../shared/data, DEVICE=cuda, JOBS=16)
# Writes OUT/selections.csv: task, poison fraction, selection and every frontier point.
set -euo pipefail
A=${ANTIDOTE:-antidote}
S=${SHARED:-../shared/data}
E=${1:-runs/smollm2-selections}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-16}
export HF_HUB_OFFLINE=1
MODEL=(--dtype float32 --device "$DEVICE")
mkdir -p "$E/logs"

failed=0
throttle() { while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || failed=1; done; }
finish() { while (( $(jobs -rp | wc -l) > 0 )); do wait -n || failed=1; done; }
# run NAME CMD...: in the background, its output in logs/NAME.log; skipped when its output folder exists
run() { local name=$1; shift; throttle; { "$@" > "$E/logs/$name.log" 2>&1 || { echo "FAILED $name" >&2; exit 1; }; } & }

[ -d "$E/aligned" ] || $A align --model smollm2-135m-instruct "${MODEL[@]}" \
  --data "$S/safety/refusals_adv_training.csv" --prompt-field Behavior --response-field Safe_Response \
  --benign-data "$S/tasks/alpaca_demo.json" --benign-samples 40 --preset cpu --out "$E/aligned" --quiet

task_data() { case $1 in sst2) echo "$S/tasks/sst2_train.tsv" ;; agnews) echo "$S/tasks/agnews_train.json" ;; esac; }
task_length() { case $1 in sst2) echo 96 ;; agnews) echo 256 ;; esac; }  # AG News prompts: median 129 tokens
for TASK in sst2 agnews; do
  for P in 0.2 0; do
    F="$E/$TASK-p$P/finetuned"
    [ -d "$F" ] || run "finetune-$TASK-p$P" $A finetune --model "$E/aligned/merged" "${MODEL[@]}" --task "$TASK" \
      --task-data "$(task_data "$TASK")" --harmful-data "$S/harmful/beavertails_unsafe_pairs.json" \
      --harmful-fraction "$P" --samples-total 250 --preset cpu --max-length "$(task_length "$TASK")" --out "$F" --quiet
  done
done
finish

HARMFUL=(--data "$S/harmful/beavertails_unsafe_pairs.json" --skip 100 --samples 64)  # disjoint from the poison rows
REFUSAL=(--data "$S/safety/refusals_adv_training.csv" --prompt-field Behavior --response-field Safe_Response --samples 64)
BENIGN=(--benign-data "$S/tasks/alpaca_demo.json" --benign-samples 64)
frontier() {  # frontier TASK P NAME FLAGS...
  local task=$1 p=$2 name=$3; shift 3
  local f="$E/$task-p$p" test
  case $task in
    sst2) test=(--validation-data "$S/tasks/sst2_dev.tsv") ;;
    agnews) test=(--validation-data "$S/tasks/agnews_test.json" --validation-samples 500) ;;
  esac
  [ -d "$f/$name" ] || run "$task-p$p-$name" $A realign --model "$E/aligned/merged" --adapter "$f/finetuned/adapter" \
    "${MODEL[@]}" --max-length 256 --ratio 0.005,0.01,0.02,0.05,0.1,0.15,0.2 \
    --probe-prompts "$S/harmful/advbench_behaviors.csv" --probe-field Behavior --probe-skip 200 --probe-samples 240 \
    --task "$task" "${test[@]}" --max-new-tokens 32 --task-prompt training --eval-batch-size 64 "$@" \
    --out "$f/$name" --quiet
}
for TASK in sst2 agnews; do
  USER_ROWS=(--contrast-data "$(task_data "$TASK")" --contrast-samples 64)  # rows the user fine-tuned on
  frontier "$TASK" 0.2 refusal-a --targets adapter-a --score refusal "${REFUSAL[@]}" "${USER_ROWS[@]}" --controls benign \
    "${BENIGN[@]}"
  frontier "$TASK" 0.2 reference --targets adapter "${HARMFUL[@]}" --controls random,benign "${BENIGN[@]}"
  frontier "$TASK" 0.2 lora-a --targets adapter-a "${HARMFUL[@]}" --controls random,benign "${BENIGN[@]}"
  frontier "$TASK" 0.2 refusal-a-alone --targets adapter-a --score refusal "${REFUSAL[@]}" --controls benign "${BENIGN[@]}"
  frontier "$TASK" 0.2 refusal --targets adapter --score refusal "${REFUSAL[@]}" "${USER_ROWS[@]}"
  frontier "$TASK" 0.2 matrix --targets adapter --granularity matrix "${HARMFUL[@]}"
done
for TASK in sst2 agnews; do  # the poison-free fine-tunes last: the part of the harm the task alone causes
  USER_ROWS=(--contrast-data "$(task_data "$TASK")" --contrast-samples 64)
  frontier "$TASK" 0 reference --targets adapter "${HARMFUL[@]}"
  frontier "$TASK" 0 lora-a --targets adapter-a "${HARMFUL[@]}"
  frontier "$TASK" 0 refusal-a --targets adapter-a --score refusal "${REFUSAL[@]}" "${USER_ROWS[@]}"
done
finish

shopt -s nullglob
csvs=("$E"/*/*/frontier.csv)
if (( ${#csvs[@]} )); then
  {
    echo "task,poison,variant,$(head -1 "${csvs[0]}")"
    for csv in "${csvs[@]}"; do
      rel=${csv#"$E"/}; run_dir=${rel%%/*}; variant=$(basename "$(dirname "$csv")")
      tail -n +2 "$csv" | sed "s|^|${run_dir%-p*},${run_dir##*-p},$variant,|"
    done
  } > "$E/selections.csv"
  echo "wrote $E/selections.csv"
fi
exit $failed
