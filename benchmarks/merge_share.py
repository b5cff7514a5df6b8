"""How much of a decode call the merge launch costs: step graphs of the 32 layers with and without it (CUDA).

Batch 1, Llama-3.1-8B geometry and the paper's masks (sink 64 / recent 256), the layers' calls back to back in one
CUDA graph as in `decode_attention.py`'s step columns. "Split only" leaves the merge launch out (its output is then
not computed): a diagnostic of where the fixed cost per call goes, not a usable kernel. Medians of 3 step graphs.

    python benchmarks/merge_share.py [--contexts 8192,32768,65536,131072]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from decode_attention import HEAD_DIM, Q_HEADS, pruned_cache, step_graph_ms

import leank_hf.kernels.decode as decode
from leank_hf import LeanKMasks


def step_ms(calls: list, merge: bool) -> float:
    """Median per-call ms of three step graphs; without `merge`, the merge kernel is not launched."""
    launch = decode._launch

    def split_only(kernel, compiled, *args):
        return compiled if kernel is decode._merge_kernel else launch(kernel, compiled, *args)

    decode._launch = launch if merge else split_only
    try:
        return statistics.median(step_graph_ms(calls) for _ in range(3))
    finally:
        decode._launch = launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", default="llama-3.1-8b-instruct")
    parser.add_argument("--contexts", default="8192,32768,65536,131072")
    args = parser.parse_args()
    masks = LeanKMasks.from_pretrained(args.masks)
    query = torch.randn(1, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    print(f"\n{torch.cuda.get_device_name()}; batch 1; masks {args.masks}; sink 64 / recent 256\n")
    print("| context | LeanK MB | split + merge us | split only us | merge us |")
    print("|---|---|---|---|---|")
    for context in (int(x) for x in args.contexts.split(",")):
        caches = [pruned_cache(masks.channel_mask[layer], 1, context, 64, 256) for layer in range(masks.num_layers)]
        calls = [functools.partial(decode.leank_decode_triton, query, cache, HEAD_DIM**-0.5) for cache, _ in caches]
        full, split = step_ms(calls, merge=True) * 1e3, step_ms(calls, merge=False) * 1e3
        megabytes = statistics.fmean(nbytes for _, nbytes in caches) / 1e6
        print(f"| {context} | {megabytes:.1f} | {full:.2f} | {split:.2f} | {full - split:.2f} |", flush=True)
        del caches, calls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
