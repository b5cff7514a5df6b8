"""Decode attention for one layer: the LeanK Triton kernel vs SDPA on the same logical cache (CUDA).

Llama-3.1-8B geometry (32 q heads, 8 KV heads, head_dim 128), bf16, random data, and the paper's learned mask of
every layer in turn (`--masks`, default the shipped `llama-3.1-8b-instruct`). For each (batch, context) it prints
median latencies (CUDA events, via triton.testing.do_bench), the speedup, the bytes each side must read (the floor
ratio is dense bytes / LeanK bytes), and the achieved bandwidth against a measured device-to-device copy.

    python benchmarks/decode_attention.py [--shapes 1x32768,1x131072,8x32768,32x8192] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import subprocess

import torch
import torch.nn.functional as F
import triton
from leank_hf.kernels import ChannelLayout, PrunedKV
from leank_hf.kernels.decode import leank_decode_triton

from leank_hf import LeanKMasks

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def pruned_cache(mask: torch.Tensor, batch: int, context: int, sink: int, recent: int) -> tuple[PrunedKV, int]:
    """A full LeanK layer cache of `context` tokens per row (window = `recent` + this step's token); its byte count."""
    layout = ChannelLayout.from_mask(mask, "cuda")
    window = recent + 1
    middle = context - sink - window

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    cache = PrunedKV(
        sink_keys=rand(batch, KV_HEADS, sink, HEAD_DIM),
        sink_values=rand(batch, KV_HEADS, sink, HEAD_DIM),
        sink_lengths=torch.full((batch,), sink, device="cuda"),
        middle_keys=rand(*layout.middle_key_shape(batch, middle)),
        middle_values=rand(batch, len(layout.value_heads), middle, HEAD_DIM),
        middle_valid=torch.ones(batch, middle, dtype=torch.bool, device="cuda"),
        middle_start=torch.zeros(batch, dtype=torch.long, device="cuda"),
        recent_keys=rand(batch, KV_HEADS, window, HEAD_DIM),
        recent_values=rand(batch, KV_HEADS, window, HEAD_DIM),
        recent_valid=torch.ones(batch, window, dtype=torch.bool, device="cuda"),
        layout=layout,
    )
    bytes_read = sum(t.numel() * t.element_size() for t in cache[:-1])
    return cache, bytes_read


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_median_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median ms of `fn` replayed from a CUDA graph: the GPU time without Python launch costs."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")


def bench_sdpa(query: torch.Tensor, context: int, scaling: float) -> tuple[float, float, int]:
    """Median ms of dense SDPA decode over `context` tokens per row (eager, graph), and the K/V bytes it reads."""
    keys = torch.randn(query.shape[0], KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)

    def attend():
        return F.scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=True)

    return median_ms(attend), graph_median_ms(attend), 2 * keys.numel() * keys.element_size()


def bench_shape(masks: LeanKMasks, batch: int, context: int, sink: int, recent: int) -> dict:
    scaling = HEAD_DIM**-0.5
    query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    dense_ms, dense_graph_ms, dense_bytes = bench_sdpa(query, context, scaling)
    leank_ms, leank_graph_ms, leank_bytes = [], [], []
    for layer in range(masks.num_layers):
        cache, nbytes = pruned_cache(masks.channel_mask[layer], batch, context, sink, recent)
        leank_ms.append(median_ms(lambda c=cache: leank_decode_triton(query, c, scaling)))
        leank_graph_ms.append(graph_median_ms(lambda c=cache: leank_decode_triton(query, c, scaling)))
        leank_bytes.append(nbytes)
        del cache
    mean_ms, mean_bytes = statistics.fmean(leank_ms), statistics.fmean(leank_bytes)
    mean_graph_ms = statistics.fmean(leank_graph_ms)
    return {
        "batch": batch, "context": context, "sink": sink, "recent": recent,
        "sdpa_ms": dense_ms, "leank_ms": mean_ms, "speedup": dense_ms / mean_ms,
        "sdpa_graph_ms": dense_graph_ms, "leank_graph_ms": mean_graph_ms,
        "graph_speedup": dense_graph_ms / mean_graph_ms,
        "floor_ratio": dense_bytes / mean_bytes,
        "sdpa_GBps": dense_bytes / dense_graph_ms / 1e6, "leank_GBps": mean_bytes / mean_graph_ms / 1e6,
        "leank_ms_min_layer": min(leank_ms), "leank_ms_max_layer": max(leank_ms),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", default="llama-3.1-8b-instruct")
    parser.add_argument("--shapes", default="1x32768,1x131072,8x32768,32x8192", help="BATCHxCONTEXT,...")
    parser.add_argument("--windows", default="64/256,128/768", help="SINK/RECENT,...")
    parser.add_argument("--csv", help="append the rows (with device, versions, git SHA, date) to this CSV")
    args = parser.parse_args()

    masks = LeanKMasks.from_pretrained(args.masks)
    device = torch.device("cuda")
    copy = copy_bandwidth(device)
    rows = []
    for window in args.windows.split(","):
        sink, recent = (int(x) for x in window.split("/"))
        for shape in args.shapes.split(","):
            batch, context = (int(x) for x in shape.split("x"))
            rows.append(bench_shape(masks, batch, context, sink, recent))
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(device)
    print(f"\n{name}; torch {torch.__version__}, triton {triton.__version__}; bf16; masks {args.masks} "
          f"(keep {masks.keep_ratio:.1%}); device copy {copy / 1e9:.0f} GB/s (read + write)\n")  # fmt: skip
    print("| batch | context | sink/recent | SDPA ms | LeanK ms | speedup | SDPA ms (graph) | LeanK ms (graph) | "
          "speedup (graph) | byte floor | SDPA GB/s | LeanK GB/s | LeanK % of copy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['sink']}/{r['recent']} | {r['sdpa_ms']:.3f} | {r['leank_ms']:.3f} "
              f"| {r['speedup']:.2f}x | {r['sdpa_graph_ms']:.3f} | {r['leank_graph_ms']:.3f} | "
              f"{r['graph_speedup']:.2f}x | {r['floor_ratio']:.2f}x | {r['sdpa_GBps']:.0f} | {r['leank_GBps']:.0f} | "
              f"{100 * r['leank_GBps'] * 1e9 / copy:.0f}% |")  # fmt: skip
    if args.csv:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "git": sha,
                "date": datetime.date.today().isoformat(), "copy_GBps": copy / 1e9}  # fmt: skip
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*meta, *rows[0]])
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows({**meta, **r} for r in rows)


if __name__ == "__main__":
    main()
