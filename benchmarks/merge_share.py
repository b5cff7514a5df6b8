"""Where the fixed cost of a batch-1 decode call goes: the merge launch, and heads of different widths.

Batch 1, Llama-3.1-8B geometry and the paper's masks (sink 64 / recent 256), the layers' calls back to back in one
CUDA graph as in `decode_attention.py`'s step columns. "Split only" leaves the merge launch out (its output is then
not computed): a diagnostic of where the fixed cost per call goes, not a usable kernel. Medians of 3 step graphs.

`--uniform-widths 32,64` adds masks with the paper's value rows (the same heads keep channels) in which every such
head keeps that many channels, so no program of the split grid streams more bytes per token than another. Per mask
set, the first and last context give a fit of time = fixed + bytes / bandwidth.

    python benchmarks/merge_share.py [--contexts 8192,32768,65536,131072] [--uniform-widths 32,64]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from decode_attention import HEAD_DIM, Q_HEADS, pruned_cache, step_graph_ms

import leank_hf.kernels.decode as decode
from leank_hf import LeanKMasks
from leank_hf.kernels.decode_kernels import _merge_kernel


def step_ms(calls: list, merge: bool) -> float:
    """Median per-call ms of three step graphs; without `merge`, the merge kernel is not launched."""
    launch = decode.launch

    def split_only(kernel, compiled, *args):
        return compiled if kernel is _merge_kernel else launch(kernel, compiled, *args)

    decode.launch = launch if merge else split_only
    try:
        return statistics.median(step_graph_ms(calls) for _ in range(3))
    finally:
        decode.launch = launch


def uniform_width(masks: torch.Tensor, width: int) -> torch.Tensor:
    """`masks` `[layers, heads, head_dim]` with every head that keeps a channel keeping the first `width` instead."""
    uniform = torch.zeros_like(masks, dtype=torch.bool)
    uniform[..., :width] = masks.bool().any(-1, keepdim=True)
    return uniform


def fit(first: tuple, last: tuple, column: int) -> str:
    """`bandwidth TB/s, fixed us` of time = fixed + bytes / bandwidth through two (MB, us, us) points, at `column`."""
    bandwidth = (last[0] - first[0]) / (last[column] - first[column])  # MB per us = TB/s
    return f"{bandwidth:.2f}, {first[column] - first[0] / bandwidth:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", default="llama-3.1-8b-instruct")
    parser.add_argument("--contexts", default="8192,32768,65536,131072")
    parser.add_argument("--uniform-widths", default="", help="kept widths of uniform-width masks to add, e.g. 32,64")
    args = parser.parse_args()
    paper = LeanKMasks.from_pretrained(args.masks).channel_mask
    mask_sets = {args.masks: paper}
    for width in (int(x) for x in args.uniform_widths.split(",") if x):
        mask_sets[f"uniform {width}"] = uniform_width(paper, width)
    contexts = [int(x) for x in args.contexts.split(",")]
    query = torch.randn(1, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    print(f"\n{torch.cuda.get_device_name()}; batch 1; sink 64 / recent 256\n")
    print("| masks | context | LeanK MB | split + merge us | split only us | merge us |")
    print("|---|---|---|---|---|---|")
    points = {}
    for name, masks in mask_sets.items():
        for context in contexts:
            caches = [pruned_cache(masks[layer], 1, context, 64, 256) for layer in range(masks.shape[0])]
            calls = [functools.partial(decode.leank_decode_triton, query, cache, HEAD_DIM**-0.5) for cache, _ in caches]
            full, split = step_ms(calls, merge=True) * 1e3, step_ms(calls, merge=False) * 1e3
            megabytes = statistics.fmean(nbytes for _, nbytes in caches) / 1e6
            points[name, context] = megabytes, full, split
            row = f"| {name} | {context} | {megabytes:.1f} | {full:.2f} | {split:.2f} | {full - split:.2f} |"
            print(row, flush=True)
            del caches, calls
            torch.cuda.empty_cache()
    if len(contexts) > 1:
        print(f"\nfit through {contexts[0]} and {contexts[-1]} tokens: time = fixed + bytes / bandwidth\n")
        print("| masks | split + merge: TB/s, fixed us | split only: TB/s, fixed us |")
        print("|---|---|---|")
        for name in mask_sets:
            first, last = points[name, contexts[0]], points[name, contexts[-1]]
            print(f"| {name} | {fit(first, last, 1)} | {fit(first, last, 2)} |")


if __name__ == "__main__":
    main()
