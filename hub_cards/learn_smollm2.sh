#!/usr/bin/env bash
# Learn the shipped SmolLM2-135M-Instruct masks and evaluate them against the baselines (run on a GPU, from the
# repository root). Stage 1 runs once; stage 2 binarises its scales at each keep ratio from the same checkpoint.
#   hub_cards/learn_smollm2.sh MODEL_DIR OUT_DIR      (MODEL_DIR holds SmolLM2-135M-Instruct.Q4_1.gguf)
set -euo pipefail
MODEL=(--model "$1" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf)
OUT=$2
TRAIN=(--lengths 1024 8000 --stage1-steps 2000 --stage2-steps 200 --save-steps 200)
python3 -m leank_hf.cli train "${MODEL[@]}" "${TRAIN[@]}" --keep-ratio 0.3 --out "$OUT/keep0.3"
for ratio in 0.5 0.2; do
    mkdir -p "$OUT/keep$ratio"
    cp -r "$OUT/keep0.3/checkpoint-2000" "$OUT/keep$ratio/"
    python3 -m leank_hf.cli train "${MODEL[@]}" "${TRAIN[@]}" --keep-ratio "$ratio" --out "$OUT/keep$ratio" --resume
done
python3 -m leank_hf.cli eval "${MODEL[@]}" --retrieval-tasks 40 --out "$OUT/eval" \
    --masks "$OUT/keep0.5/leank_masks" "$OUT/keep0.3/leank_masks" "$OUT/keep0.2/leank_masks"
