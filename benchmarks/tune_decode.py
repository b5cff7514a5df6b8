"""Sweep the decode kernel's launch parameters (`DecodeTuning`) per shape; what its defaults were chosen from.

GPU time of one layer's decode step replayed from a CUDA graph, averaged over a few layers' masks of the paper's
Llama-3.1-8B mask (sink 64 / recent 256), for every combination of tile size, warps, pipeline stages, split sizes and
how many waves of programs the split count may fill. `--kept 32,128` adds masks where every head keeps that many
channels: how fast the kernel streams bytes when no head differs from another. Prints the best tunings per shape with
their bandwidth next to the defaults' and SDPA, and writes every row to a CSV.

    python benchmarks/tune_decode.py --shapes 1x32768,8x32768 --csv tune.csv
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics

import torch
import triton
from decode_attention import HEAD_DIM, KV_HEADS, Q_HEADS, Timer, bench_sdpa, graph_median_ms, pruned_cache

from leank_hf import LeanKMasks
from leank_hf.kernels.decode import DecodeTuning, leank_decode_triton


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def layer_masks(name: str, masks: LeanKMasks, layers: list[int]) -> list[torch.Tensor]:
    """The paper's masks of `layers`, or one mask in which every head keeps the first `name` channels."""
    if name == "paper":
        return [masks.channel_mask[layer] for layer in layers]
    uniform = torch.zeros(KV_HEADS, HEAD_DIM, dtype=torch.bool)
    uniform[:, : int(name)] = True
    return [uniform]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", default="llama-3.1-8b-instruct")
    parser.add_argument("--kept", default="paper", help="'paper' and/or uniform kept counts, e.g. paper,32,128")
    parser.add_argument("--shapes", default="1x32768,1x131072,8x32768,32x8192", help="BATCHxCONTEXT,...")
    parser.add_argument("--layers", default="0,15,30", help="paper-mask layers to average over")
    parser.add_argument("--block-n", default="32,64,128")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument("--min-split-tokens", default="256")
    parser.add_argument("--full-split-tokens", default="128,384")
    parser.add_argument("--max-waves", default="1,2,4")
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--csv")
    args = parser.parse_args()

    masks = LeanKMasks.from_pretrained(args.masks)
    scaling = HEAD_DIM**-0.5
    timer = Timer()
    tunings = [
        DecodeTuning(*values)
        for values in itertools.product(
            ints(args.block_n), ints(args.warps), ints(args.stages), ints(args.min_split_tokens),
            ints(args.full_split_tokens), ints(args.max_waves),
        )
    ]  # fmt: skip
    rows = []
    for kept, shape in itertools.product(args.kept.split(","), args.shapes.split(",")):
        batch, context = ints(shape.replace("x", ","))
        query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        sdpa = bench_sdpa(query, context, scaling, timer, layers=1)
        sdpa_ms, sdpa_bytes = sdpa["ms"], sdpa["bytes"]
        built = [pruned_cache(mask, batch, context, 64, 256) for mask in layer_masks(kept, masks, ints(args.layers))]
        leank_bytes = statistics.fmean(nbytes for _, nbytes in built)
        picked = DecodeTuning()
        timed = {}
        for tuning in [picked, *tunings]:
            if tuning in timed:
                continue
            try:
                timed[tuning] = statistics.fmean(
                    graph_median_ms(
                        lambda q=query, c=cache, t=tuning: leank_decode_triton(q, c, scaling, t),
                        timer.flush.clean,
                        reps=25,
                    )
                    for cache, _ in built
                )
            except triton.runtime.errors.OutOfResources as error:
                print(f"  {tuning}: skipped ({error})", flush=True)
                continue
            rows.append({"kept": kept, "batch": batch, "context": context, **tuning._asdict(), "ms": timed[tuning],
                         "GBps": leank_bytes / timed[tuning] / 1e6, "sdpa_ms": sdpa_ms})  # fmt: skip
            print(f"  {kept} {batch}x{context} {tuning}: {timed[tuning]:.4f} ms", flush=True)
        ranked = sorted(timed.items(), key=lambda item: item[1])
        print(f"\nmask {kept}, batch {batch}, context {context}: SDPA {sdpa_ms:.4f} ms "
              f"({sdpa_bytes / sdpa_ms / 1e6:.0f} GB/s); byte floor {sdpa_bytes / leank_bytes:.2f}x; "
              f"default -> {timed[picked]:.4f} ms ({sdpa_ms / timed[picked]:.2f}x)")  # fmt: skip
        for tuning, ms in ranked[: args.top]:
            print(f"  {ms:.4f} ms  {sdpa_ms / ms:.2f}x  {leank_bytes / ms / 1e6:.0f} GB/s  {tuning}")
        del built
        torch.cuda.empty_cache()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
