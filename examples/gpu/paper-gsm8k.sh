#!/usr/bin/env bash
# The paper's GSM8K setting on ONE GPU, stage by stage through the CLI, with vLLM generation:
# Llama-2-7B, alignment on 5,000 BeaverTails safe rows, poisoned fine-tuning on n=5,000 rows with p=0.2,
# Antidote (alpha 0.05) calibrated on 2,000 unsafe rows disjoint from the poison, and HS (beaver-dam-7b,
# 1,000 BeaverTails 30k_test prompts, 512 new tokens) / FA (first 1,000 GSM8K test rows) for the
# fine-tuned model with and without Antidote. Paper (lr 1e-4): SFT 77.8 / 21.9, Antidote 65.3 / 16.1.
#
#   pip install 'antidote-llm[vllm]'   # and access to meta-llama/Llama-2-7b-hf on the hub
#   RUN=runs/paper-gsm8k LR=1e-4 bash examples/gpu/paper-gsm8k.sh
#
# Expected time and peak GPU memory per stage: ESTIMATES, NOT YET MEASURED ON A GPU. They come from
# token counts measured here (BeaverTails pairs ~135 tokens, GSM8K training rows ~260 with the Alpaca
# template), FLOP counts (LoRA training ~4 x 6.7e9 FLOPs/token, forward 2 x 6.7e9) at 25-40% of the
# card's bf16 peak, and memory scaled from the CPU runs (realign peaks at ~1.1x the weights in memory).
#
#   stage               | H100 80 GB       | A100 80 GB      | peak GPU memory
#   align (20 epochs)   | 15-25 min        | 0.8-1.3 h       | ~35-40 GB (bf16 weights 13.5, LoRA r=256 + AdamW 3.2, activations)
#   finetune (20 ep.)   | 27-45 min        | 1.4-2.2 h       | ~35-40 GB (GSM8K rows up to ~600 tokens, batch 5)
#   realign             | 2-4 min (load, 2,000 rows ~0.3M tokens forward, save merged 13.5 GB)
#                       |                  |                 | ~15-17 GB in memory; ~4 GB with --offload
#   evaluate (vLLM)     | 4-10 min each    | 6-15 min each   | vLLM takes 90% of the card (weights + KV cache)
#   judge (beaver-dam)  | 1-3 min each     | 2-4 min each    | ~15 GB (7B classifier, bf16)
#   total               | ~1.5 h           | ~3-4 h          |
#
# The judge runs as its own command after generation: vLLM keeps 90% of the GPU for its KV cache while
# it lives, and beaver-dam-7b needs ~14 GB more.
set -euo pipefail

RUN=${RUN:-runs/paper-gsm8k}
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
LR=${LR:-1e-4}                       # the paper's table sweeps 1e-5, 1e-4, 1e-3
BEAVERTAILS=hf:PKU-Alignment/BeaverTails:30k_train
ANTIDOTE=${ANTIDOTE:-antidote}
mkdir -p "$RUN"

stage() {  # run a stage once: a finished output folder is kept, so a re-run resumes
  local out=$1; shift
  if [ -f "$out/report.json" ] || [ -f "$out/metrics.json" ] || [ -f "$out.jsonl" ]; then
    echo "== $out: done, kept"; return
  fi
  echo "== $out: $*"
  local start=$SECONDS
  "$@"
  echo "== $out: $((SECONDS - start)) s (peak memory: the memory field of its report.json / metrics.json)"
}

# 1. alignment: LoRA r=256 on (harmful prompt, refusal) rows, merged into the base
stage "$RUN/aligned" "$ANTIDOTE" align --model "$MODEL" --dtype bfloat16 \
  --data "$BEAVERTAILS" --safety safe --samples 5000 --preset paper --out "$RUN/aligned"

# 2. the user's fine-tuning: 1,000 unsafe rows (the first) + 4,000 GSM8K rows, a fresh LoRA
stage "$RUN/finetuned" "$ANTIDOTE" finetune --model "$RUN/aligned/merged" --dtype bfloat16 \
  --task gsm8k --harmful-data "$BEAVERTAILS" --harmful-fraction 0.2 --samples-total 5000 \
  --preset paper --lr "$LR" --out "$RUN/finetuned"

# 3. Antidote on the fine-tuning adapter: 2,000 unsafe rows after the first 5,000 (disjoint from the poison)
stage "$RUN/antidote" "$ANTIDOTE" realign --model "$RUN/aligned/merged" --adapter "$RUN/finetuned/adapter" \
  --dtype bfloat16 --data "$BEAVERTAILS" --skip 5000 --samples 2000 --ratio 0.05 --save-merged \
  --out "$RUN/antidote"

# 4. evaluation: vLLM generation (answers judged by the offline refusal judge on the way), then beaver-dam
evaluate() {  # name, then the model arguments
  local name=$1; shift
  stage "$RUN/eval-$name" "$ANTIDOTE" evaluate "$@" --dtype bfloat16 --backend vllm --task gsm8k \
    --judge refusal --out "$RUN/eval-$name"
  stage "$RUN/eval-$name/beaver-dam" "$ANTIDOTE" judge --judge beaver-dam \
    --input "$RUN/eval-$name/answers.jsonl" --out "$RUN/eval-$name/beaver-dam.jsonl"
}
evaluate none --model "$RUN/aligned/merged" --adapter "$RUN/finetuned/adapter"
evaluate antidote --model "$RUN/antidote/merged"

echo "== HS (beaver-dam) is in the judge lines above; FA and the refusal-judge HS in $RUN/eval-*/summary.md"
cat "$RUN"/eval-*/summary.md
