"""One mask-learning step (forward + backward of `MaskLearner`) on the embedded SmolLM2-135M-Instruct: time and peak
memory at a given prompt length, on the CPU or the GPU.

    python benchmarks/mask_learning_step.py --tokens 8000 [--stage binary]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from leank_hf.embedded import load_embedded_model
from leank_hf.training import make_retrieval_dataset, prepare_for_mask_learning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8000, help="prompt length of the retrieval example")
    parser.add_argument("--stage", choices=["continuous", "binary"], default="binary")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_embedded_model(device=device)
    learner = prepare_for_mask_learning(model)
    learner.stage, learner.keep_ratio = args.stage, 0.3
    item = make_retrieval_dataset(tokenizer, (args.tokens, args.tokens), 1)[0]
    batch = {key: torch.tensor([value], device=device) for key, value in item.items()}

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    learner(**batch).loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:
        peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    print(f"{batch['input_ids'].shape[1]} tokens, {args.stage} stage, {device}: "
          f"{time.perf_counter() - start:.1f} s per step, {peak}")  # fmt: skip


if __name__ == "__main__":
    main()
