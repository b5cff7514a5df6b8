"""Decode attention for one layer: the LeanK Triton kernel vs SDPA on the same logical cache (CUDA).

Llama-3.1-8B geometry (32 q heads, 8 KV heads, head_dim 128), bf16, random data, and the paper's learned mask of
every layer in turn (`--masks`, default the shipped `llama-3.1-8b-instruct`). SDPA runs with each backend that takes
the call (cuDNN, flash, memory-efficient) and the fastest one is the baseline. For each (batch, context) it prints
median GPU times from CUDA events around replays of a CUDA graph, the L2 emptied before each replay by reading a
256 MB buffer (`L2Flush`), the speedup, the bytes each side must read (the floor ratio is dense bytes / LeanK bytes)
and the achieved bandwidth against a measured device-to-device copy. "Step" columns time the layers' calls back to
back in one graph, each on a cache of its own, as a decode step runs them (`step_graph_ms`; every layer, or every n-th
where their caches would pass `STEP_BYTES`): per call, without the graph launch and events that a one-call graph
times with it. Two more columns: eager calls timed by `triton.testing.do_bench` (Python launch costs included), and
the speedup when the L2 is emptied by writing the buffer instead (do_bench's way), which leaves dirty lines whose
write-back lands in the timed call.

    python benchmarks/decode_attention.py [--shapes 1x32768,1x131072,8x32768,32x8192] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import os
import statistics
import subprocess
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from leank_hf import LeanKMasks
from leank_hf.kernels import ChannelLayout, PrunedKV
from leank_hf.kernels.decode import leank_decode_triton

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
STEP_BYTES = 24 * 10**9  # most cache bytes one side's step graph holds at once


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
    bytes_read = sum(t.numel() * t.element_size() for t in cache if isinstance(t, torch.Tensor))
    return cache, bytes_read


def median_ms(fn) -> float:
    """Median ms of eager calls (`triton.testing.do_bench`): Python launch costs included."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


class L2Flush:
    """Empties the L2 before a timed call, so that the cache is read from HBM as in a model (each layer's cache is
    read once per step, with the layer's weights in between).

    `clean` reads a buffer larger than the L2, which then holds clean lines, as after a layer's weight reads.
    `dirty` writes it, as `triton.testing.do_bench` does: the L2 then holds dirty lines, and their write-back
    (~50 MB, ~9 us on an H100 whatever the kernel) lands in the timed call.
    """

    def __init__(self, device: torch.device, nbytes: int = 256 * 2**20):
        self.buffer = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
        self.total = torch.empty((), dtype=torch.float32, device=device)

    def clean(self) -> None:
        torch.sum(self.buffer, dim=0, out=self.total)

    def dirty(self) -> None:
        self.buffer.zero_()


def graph_median_ms(fn: Callable[[], object], flush: Callable[[], None], reps: int = 100) -> float:
    """Median ms of `fn` replayed from a CUDA graph (GPU time without Python launch costs), `flush` before each replay
    and outside the timed events."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        flush()
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush()  # keeps the GPU busy while the host queues the replay, so host latency is not timed
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends, strict=True))


def step_graph_ms(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """Median ms per call of `calls` captured back to back in one CUDA graph, as a decode step runs its layers'
    attention: each call reads its own cache, and the other calls read far more than the L2 holds before it is read
    again, so no call finds its bytes there (no flush needed); the graph launch and events (~4.7 us on an H100, which
    `graph_median_ms` times with every call) are paid once for all the calls."""
    for call in calls:  # compile outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)) / len(calls)


def bench_sdpa(query: torch.Tensor, context: int, scaling: float, flush: L2Flush, layers: int) -> dict:
    """Dense SDPA decode over `context` tokens per row with the fastest backend that takes the call: its name, median
    ms (graph, graph with a dirty L2, eager; and per call in a graph of up to `layers` calls back to back, each on a
    cache of its own, as many as `STEP_BYTES` holds, with the fastest backend there) and the K/V bytes it reads."""
    layer_bytes = 2 * query.shape[0] * KV_HEADS * context * HEAD_DIM * 2
    shape = (query.shape[0], KV_HEADS, context, HEAD_DIM)
    caches = [
        tuple(torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in ("keys", "values"))
        for _ in range(max(2, min(layers, STEP_BYTES // layer_bytes)))
    ]
    best, step_ms = None, float("inf")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):

        def attend(keys=caches[0][0], values=caches[0][1], backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=True)

        try:
            attend()
        except RuntimeError:  # this backend does not take the call (memory-efficient has no GQA)
            continue
        step_ms = min(step_ms, step_graph_ms([functools.partial(attend, *cache) for cache in caches]))
        ms = graph_median_ms(attend, flush.clean)
        if best is None or ms < best["ms"]:
            best = {"backend": backend.name.lower(), "ms": ms, "dirty_ms": graph_median_ms(attend, flush.dirty),
                    "eager_ms": median_ms(attend)}  # fmt: skip
    if best is None:
        raise RuntimeError(f"no SDPA backend takes a bf16 GQA decode call of shape {tuple(query.shape)} on this GPU")
    keys = caches[0][0]
    return {**best, "step_ms": step_ms, "bytes": 2 * keys.numel() * keys.element_size()}


def bench_shape(masks: LeanKMasks, batch: int, context: int, sink: int, recent: int, flush: L2Flush) -> dict:
    """SDPA and LeanK (averaged over every layer's mask) at one shape; times in ms."""
    scaling = HEAD_DIM**-0.5
    query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    sdpa = bench_sdpa(query, context, scaling, flush, masks.num_layers)
    torch.cuda.empty_cache()
    timings = {"ms": [], "dirty_ms": [], "eager_ms": [], "bytes": []}
    for layer in range(masks.num_layers):
        cache, nbytes = pruned_cache(masks.channel_mask[layer], batch, context, sink, recent)
        attend = functools.partial(leank_decode_triton, query, cache, scaling)
        timings["ms"].append(graph_median_ms(attend, flush.clean))
        timings["dirty_ms"].append(graph_median_ms(attend, flush.dirty))
        timings["eager_ms"].append(median_ms(attend))
        timings["bytes"].append(nbytes)
        del cache, attend
    leank = {key: statistics.fmean(values) for key, values in timings.items()}
    # The step graph: every layer, or every n-th where all of them would not fit `STEP_BYTES`.
    every = max(1, math.ceil(sum(timings["bytes"]) / STEP_BYTES))
    caches = [pruned_cache(masks.channel_mask[layer], batch, context, sink, recent)[0]
              for layer in range(0, masks.num_layers, every)]  # fmt: skip
    leank["step_ms"] = step_graph_ms([functools.partial(leank_decode_triton, query, c, scaling) for c in caches])
    leank["step_bytes"] = statistics.fmean(timings["bytes"][::every])
    del caches
    return {
        "batch": batch, "context": context, "sink": sink, "recent": recent, "sdpa_backend": sdpa["backend"],
        "sdpa_ms": sdpa["ms"], "leank_ms": leank["ms"], "speedup": sdpa["ms"] / leank["ms"],
        "sdpa_step_ms": sdpa["step_ms"], "leank_step_ms": leank["step_ms"],
        "step_speedup": sdpa["step_ms"] / leank["step_ms"],
        "dirty_speedup": sdpa["dirty_ms"] / leank["dirty_ms"],
        "sdpa_eager_ms": sdpa["eager_ms"], "leank_eager_ms": leank["eager_ms"],
        "eager_speedup": sdpa["eager_ms"] / leank["eager_ms"],
        "floor_ratio": sdpa["bytes"] / leank["bytes"],
        "sdpa_GBps": sdpa["bytes"] / sdpa["ms"] / 1e6, "leank_GBps": leank["bytes"] / leank["ms"] / 1e6,
        "sdpa_step_GBps": sdpa["bytes"] / sdpa["step_ms"] / 1e6,
        "leank_step_GBps": leank["step_bytes"] / leank["step_ms"] / 1e6,
        "leank_ms_min_layer": min(timings["ms"]), "leank_ms_max_layer": max(timings["ms"]),
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
    flush = L2Flush(device)
    rows = []
    for window in args.windows.split(","):
        sink, recent = (int(x) for x in window.split("/"))
        for shape in args.shapes.split(","):
            batch, context = (int(x) for x in shape.split("x"))
            rows.append(bench_shape(masks, batch, context, sink, recent, flush))
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(device)
    print(f"\n{name}; torch {torch.__version__}, triton {triton.__version__}; bf16; masks {args.masks} "
          f"(keep {masks.keep_ratio:.1%}); device copy {copy / 1e9:.0f} GB/s (read + write)\n")  # fmt: skip
    print("| batch | context | sink/recent | SDPA backend | SDPA ms | LeanK ms | **speedup** | SDPA ms, step | "
          "LeanK ms, step | **speedup, step** | byte floor | SDPA GB/s | LeanK GB/s | LeanK % of copy | "
          "LeanK % of copy, step | speedup, dirty L2 | SDPA eager ms | LeanK eager ms | eager speedup |")  # fmt: skip
    print("|---" * 19 + "|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['sink']}/{r['recent']} | {r['sdpa_backend']} | "
              f"{r['sdpa_ms']:.4f} | {r['leank_ms']:.4f} | **{r['speedup']:.2f}x** | {r['sdpa_step_ms']:.4f} | "
              f"{r['leank_step_ms']:.4f} | **{r['step_speedup']:.2f}x** | {r['floor_ratio']:.2f}x | "
              f"{r['sdpa_GBps']:.0f} | {r['leank_GBps']:.0f} | {100 * r['leank_GBps'] * 1e9 / copy:.0f}% | "
              f"{100 * r['leank_step_GBps'] * 1e9 / copy:.0f}% | {r['dirty_speedup']:.2f}x | "
              f"{r['sdpa_eager_ms']:.3f} | {r['leank_eager_ms']:.3f} | {r['eager_speedup']:.2f}x |")  # fmt: skip
    if args.csv:
        sha = (
            os.environ.get("LEANK_GIT_SHA")
            or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        )
        meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "git": sha,
                "date": datetime.date.today().isoformat(), "copy_GBps": copy / 1e9}  # fmt: skip
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*meta, *rows[0]])
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows({**meta, **r} for r in rows)


if __name__ == "__main__":
    main()
