#!/usr/bin/env bash
# Evaluate the learned SmolLM2 masks of learn_smollm2.sh against the full cache and the baselines, one process per
# keep ratio in parallel (decoding a 135M model is bound by Python, not by the GPU), then merge the tables and record
# each ratio's rows in its mask repo's card.
#   hub_cards/evaluate_smollm2.sh MODEL_DIR OUT_DIR
set -euo pipefail
MODEL=(--model "$1" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf)
OUT=$2
mkdir -p "$OUT/eval"
for ratio in 0.5 0.3 0.2; do
    python3 -m leank_hf.cli eval "${MODEL[@]}" --keep-ratios "$ratio" --retrieval-tasks 40 --out "$OUT/eval/keep$ratio" \
        --masks "$OUT/keep$ratio/leank_masks" --record-in "$OUT/keep$ratio/leank_masks" > "$OUT/eval/keep$ratio.log" 2>&1 &
done
wait
python3 - "$OUT/eval" <<'PY'
import json
import sys
from pathlib import Path

from leank_hf.eval import format_table, plot_accuracy
from leank_hf.io import write_json

out = Path(sys.argv[1])
parts = [json.loads((out / f"keep{ratio}" / "eval.json").read_text())["rows"] for ratio in ("0.5", "0.3", "0.2")]
assert all(part[0] == parts[0][0] for part in parts), "every process saw the same full-cache results"
rows = parts[0][:1] + [row for part in parts for row in part[1:]]
write_json(out / "eval.json", {"rows": rows})
(out / "eval.md").write_text(format_table(rows) + "\n", encoding="utf-8")
plot_accuracy(rows, out / "accuracy_vs_keep_ratio.png")
print(format_table(rows))
PY
