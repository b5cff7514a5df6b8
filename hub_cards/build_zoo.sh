#!/usr/bin/env bash
# Rebuild the mask repos shipped in hub_cards/zoo/ (run from the repository root, with ../shared beside it).
#   bash hub_cards/build_zoo.sh [SMOLLM2_RUN]
# SMOLLM2_RUN is the output dir of hub_cards/learn_smollm2.sh (a GPU run; it records the evaluation in the masks'
# card); without it the shipped SmolLM2 masks are left as they are.
set -euo pipefail
NOTE='## Source and licence

Converted without changing a value from the masks published with the LeanK paper (arXiv 2508.02215) in the public
MInference repository (MIT licence), files `minference/configs/leank/*.pth`. Learned by the paper'"'"'s two-stage
distillation; leank-hf only changed the file format.'
rm -rf hub_cards/zoo/llama-3.1-8b-instruct hub_cards/zoo/qwen2.5-7b-instruct
leank-hf convert ../shared/reference_masks/llama-3.1-8b-instruct.safetensors hub_cards/zoo/llama-3.1-8b-instruct \
    --base-model meta-llama/Llama-3.1-8B-Instruct --model-type llama --source-note "$NOTE"
leank-hf convert ../shared/reference_masks/qwen2.5-7b-instruct.safetensors hub_cards/zoo/qwen2.5-7b-instruct \
    --base-model Qwen/Qwen2.5-7B-Instruct --model-type qwen2 --source-note "$NOTE"
if [ -n "${1:-}" ]; then
    rm -rf hub_cards/zoo/smollm2-135m-instruct
    cp -r "$1/keep0.3/leank_masks" hub_cards/zoo/smollm2-135m-instruct
fi
