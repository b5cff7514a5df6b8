#!/usr/bin/env bash
# Rebuild the mask repos shipped in hub_cards/zoo/ (run from the repository root, with ../shared beside it).
set -euo pipefail
NOTE='## Source and licence

Converted without changing a value from the masks published with the LeanK paper (arXiv 2508.02215) in the public
MInference repository (MIT licence), files `minference/configs/leank/*.pth`. Learned by the paper'"'"'s two-stage
distillation; leank-hf only changed the file format.'
rm -rf hub_cards/zoo/llama-3.1-8b-instruct hub_cards/zoo/qwen2.5-7b-instruct hub_cards/zoo/smollm2-135m-instruct
leank-hf convert ../shared/reference_masks/llama-3.1-8b-instruct.safetensors hub_cards/zoo/llama-3.1-8b-instruct \
    --base-model meta-llama/Llama-3.1-8B-Instruct --model-type llama --source-note "$NOTE"
leank-hf convert ../shared/reference_masks/qwen2.5-7b-instruct.safetensors hub_cards/zoo/qwen2.5-7b-instruct \
    --base-model Qwen/Qwen2.5-7B-Instruct --model-type qwen2 --source-note "$NOTE"
python examples/long_context_qa.py --calibrate hub_cards/zoo/smollm2-135m-instruct
