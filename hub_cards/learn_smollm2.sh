#!/usr/bin/env bash
# Learn the shipped SmolLM2-135M-Instruct masks and evaluate them against the baselines (run on a GPU, from the
# repository root). Stage 1 runs once; stage 2 binarises its scales at each keep ratio from the same checkpoint.
#   hub_cards/learn_smollm2.sh MODEL_DIR OUT_DIR      (MODEL_DIR holds SmolLM2-135M-Instruct.Q4_1.gguf)
set -euo pipefail
MODEL=(--model "$1" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf)
OUT=$2
# Stage 2 at lr 0.002, not the paper's 0.01: on SmolLM2 0.01 churned the binary masks and raised the held-out KL
# (BENCHMARKS.md, "Learned masks").
# --mixture facts: the data the shipped masks were learned on (the default is now the RULER-style mixture).
TRAIN=(--lengths 1024 8000 --stage1-steps 2000 --stage2-steps 200 --stage2-lr 0.002 --save-steps 200
       --base-model HuggingFaceTB/SmolLM2-135M-Instruct --mixture facts)
python3 -m leank_hf.cli train "${MODEL[@]}" "${TRAIN[@]}" --keep-ratio 0.3 --out "$OUT/keep0.3"
for ratio in 0.5 0.2; do
    mkdir -p "$OUT/keep$ratio"
    cp -r "$OUT/keep0.3/checkpoint-2000" "$OUT/keep$ratio/"
    python3 -m leank_hf.cli train "${MODEL[@]}" "${TRAIN[@]}" --keep-ratio "$ratio" --out "$OUT/keep$ratio" --resume
done
"$(dirname "$0")/evaluate_smollm2.sh" "$1" "$OUT"
