"""Decode attention for one layer: the LeanK Triton kernel vs SDPA on the same logical cache (CUDA).

Issue 24's runs (a quantized middle; not run yet, BENCHMARKS.md "Issue 24 GPU runs"), one call of ~5 minutes:

    python benchmarks/decode_attention.py --shapes 1x32768,1x131072,8x32768,32x8192 --windows 64/256 --kv-bits 8,4 \
        --csv benchmarks/results/decode_attention_quantized_h100.csv

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

`--kv-bits 8,4` adds, for each shape, the same kernel over the same caches with their middle quantized
(`QuantizedPrunedKV.quantize`: keys per channel over blocks of 64 tokens, the window's flush; values per token in
groups of 64 channels, the library's default `q_group_size`), timed the same way, and a second table with a row per
middle (bf16, int8, int4): speedup against the same SDPA baseline, the bytes read (codes, fp16 scales and zeros of
the middle; sink and window at full width), the byte floor and the bandwidth against the copy. Without it the table
and CSV columns are the ones earlier runs gave; with it the CSV gets `int8_*`/`int4_*` columns (write a new file).

`--dry-run` checks the script on the CPU under Triton's interpreter (fp16: it has no bf16): every call runs once on two
layers' masks and nothing is timed (times print as 1 ms).

    python benchmarks/decode_attention.py [--shapes 1x32768,1x131072,8x32768,32x8192] [--kv-bits 8,4] [--csv out.csv]
    TRITON_INTERPRET=1 python benchmarks/decode_attention.py --dry-run --shapes 1x1024 --windows 64/256 --kv-bits 8,4
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
from leank_hf.kernels import ChannelLayout, PrunedKV, QuantizedPrunedKV
from leank_hf.kernels.decode import leank_decode_triton

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
STEP_BYTES = 24 * 10**9  # most cache bytes one side's step graph holds at once
KEY_BLOCK = 64  # middle tokens per block of key scales: the window's flush (`block_size`), as a LeanKCache stores them
VALUE_GROUP = 64  # channels per group of value scales: the library's default `q_group_size`


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def cache_bytes(cache: PrunedKV | QuantizedPrunedKV) -> int:
    """Bytes of every tensor of one layer's cache: what the decode kernel reads, as this script counts it. A quantized
    middle counts its codes, scales and zeros; the sink and window are full width either way. The query, the partial
    results and the output are not counted (nor SDPA's, whose count is its dense keys and values); the middle's flags
    (`middle_valid`, a byte per token and row, which the kernel does not read) are, as they always were here."""
    tensors = [*cache.cache, *cache[1:]] if isinstance(cache, QuantizedPrunedKV) else cache
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def pruned_cache(
    mask: torch.Tensor, batch: int, context: int, sink: int, recent: int, *, device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[PrunedKV, int]:  # fmt: skip
    """A full LeanK layer cache of `context` tokens per row (window = `recent` + this step's token); its byte count."""
    layout = ChannelLayout.from_mask(mask, device)
    window = recent + 1
    middle = context - sink - window

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    cache = PrunedKV(
        sink_keys=rand(batch, KV_HEADS, sink, HEAD_DIM),
        sink_values=rand(batch, KV_HEADS, sink, HEAD_DIM),
        sink_lengths=torch.full((batch,), sink, device=device),
        middle_keys=rand(*layout.middle_key_shape(batch, middle)),
        middle_values=rand(batch, len(layout.value_heads), middle, HEAD_DIM),
        middle_valid=torch.ones(batch, middle, dtype=torch.bool, device=device),
        middle_start=torch.zeros(batch, dtype=torch.long, device=device),
        recent_keys=rand(batch, KV_HEADS, window, HEAD_DIM),
        recent_values=rand(batch, KV_HEADS, window, HEAD_DIM),
        recent_valid=torch.ones(batch, window, dtype=torch.bool, device=device),
        layout=layout,
    )
    return cache, cache_bytes(cache)


def leank_cache(
    mask: torch.Tensor, batch: int, context: int, sink: int, recent: int, bits: int | None, *,
    device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
) -> tuple[PrunedKV | QuantizedPrunedKV, int]:  # fmt: skip
    """`pruned_cache`, its middle quantized to `bits` (key blocks of `KEY_BLOCK` tokens, value groups of `VALUE_GROUP`
    channels) unless `bits` is None; its byte count."""
    cache, nbytes = pruned_cache(mask, batch, context, sink, recent, device=device, dtype=dtype)
    if bits is None:
        return cache, nbytes
    quantized = QuantizedPrunedKV.quantize(cache, bits, block_size=KEY_BLOCK, group_size=VALUE_GROUP)
    return quantized, cache_bytes(quantized)


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


class Timer:
    """Where the calls run (bf16 on CUDA) and how they are timed: `one_call` in a graph after a clean L2 flush,
    `dirty` after a dirty one, `eager` as plain calls, `step` back to back in one graph (per call)."""

    device = torch.device("cuda")
    dtype = torch.bfloat16

    def __init__(self) -> None:
        self.flush = L2Flush(self.device)

    def one_call(self, fn: Callable[[], object]) -> float:
        return graph_median_ms(fn, self.flush.clean)

    def dirty(self, fn: Callable[[], object]) -> float:
        return graph_median_ms(fn, self.flush.dirty)

    def eager(self, fn: Callable[[], object]) -> float:
        return median_ms(fn)

    def step(self, calls: list[Callable[[], object]]) -> float:
        return step_graph_ms(calls)

    def copy_bandwidth(self) -> float:
        return copy_bandwidth(self.device)

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device)


class DryRunTimer(Timer):
    """`--dry-run`: fp16 on the CPU (Triton's interpreter has no bf16); `one_call` and `step` run each call once and
    every time is 1 ms, nothing is measured."""

    device = torch.device("cpu")
    dtype = torch.float16

    def __init__(self) -> None:
        pass

    def one_call(self, fn: Callable[[], object]) -> float:
        fn()
        return 1.0

    def dirty(self, fn: Callable[[], object]) -> float:
        return 1.0

    eager = dirty

    def step(self, calls: list[Callable[[], object]]) -> float:
        for call in calls:
            call()
        return 1.0

    def copy_bandwidth(self) -> float:
        return math.nan

    def device_name(self) -> str:
        return "DRY RUN on the CPU (Triton interpreter, fp16): no time is measured"


def bench_sdpa(query: torch.Tensor, context: int, scaling: float, timer: Timer, layers: int) -> dict:
    """Dense SDPA decode over `context` tokens per row with the fastest backend that takes the call: its name, median
    ms (graph, graph with a dirty L2, eager; and per call in a graph of up to `layers` calls back to back, each on a
    cache of its own, as many as `STEP_BYTES` holds, with the fastest backend there) and the K/V bytes it reads."""
    layer_bytes = 2 * query.shape[0] * KV_HEADS * context * HEAD_DIM * 2
    shape = (query.shape[0], KV_HEADS, context, HEAD_DIM)
    caches = [
        tuple(torch.randn(shape, device=query.device, dtype=query.dtype) for _ in ("keys", "values"))
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
        step_ms = min(step_ms, timer.step([functools.partial(attend, *cache) for cache in caches]))
        ms = timer.one_call(attend)
        if best is None or ms < best["ms"]:
            best = {"backend": backend.name.lower(), "ms": ms, "dirty_ms": timer.dirty(attend),
                    "eager_ms": timer.eager(attend)}  # fmt: skip
    if best is None:
        raise RuntimeError(f"no SDPA backend takes a bf16 GQA decode call of shape {tuple(query.shape)} on this GPU")
    keys = caches[0][0]
    return {**best, "step_ms": step_ms, "bytes": 2 * keys.numel() * keys.element_size()}


def bench_leank(
    query: torch.Tensor, scaling: float, timer: Timer, make_cache: Callable[[int], tuple], layers: list[int]
) -> dict:
    """LeanK's kernel over each of `layers`' caches as `make_cache(layer)` builds them ((cache, bytes), the middle in
    the model's dtype or quantized): mean ms over the layers (graph, dirty L2, eager), the fastest and slowest layer,
    and ms per call with the layers' calls back to back in one graph (every layer, or every n-th where all of their
    caches would pass `STEP_BYTES`); the bytes read, mean over the layers and over the step's layers."""
    timings = {"ms": [], "dirty_ms": [], "eager_ms": [], "bytes": []}
    for layer in layers:
        cache, nbytes = make_cache(layer)
        attend = functools.partial(leank_decode_triton, query, cache, scaling)
        timings["ms"].append(timer.one_call(attend))
        timings["dirty_ms"].append(timer.dirty(attend))
        timings["eager_ms"].append(timer.eager(attend))
        timings["bytes"].append(nbytes)
        del cache, attend
    leank = {key: statistics.fmean(values) for key, values in timings.items()}
    leank["ms_min_layer"], leank["ms_max_layer"] = min(timings["ms"]), max(timings["ms"])
    # The step graph: every layer, or every n-th where all of them would not fit `STEP_BYTES`.
    every = max(1, math.ceil(sum(timings["bytes"]) / STEP_BYTES))
    caches = [make_cache(layer)[0] for layer in layers[::every]]
    leank["step_ms"] = timer.step([functools.partial(leank_decode_triton, query, c, scaling) for c in caches])
    leank["step_bytes"] = statistics.fmean(timings["bytes"][::every])
    return leank


def versus_sdpa(sdpa: dict, leank: dict) -> dict:
    """LeanK's columns of a row (`bench_leank`'s timings against `bench_sdpa`'s): ms, speedups, byte floor (dense
    bytes / LeanK's), bandwidth on the bytes each side reads, MB read."""
    return {
        "leank_ms": leank["ms"], "speedup": sdpa["ms"] / leank["ms"], "leank_step_ms": leank["step_ms"],
        "step_speedup": sdpa["step_ms"] / leank["step_ms"], "dirty_speedup": sdpa["dirty_ms"] / leank["dirty_ms"],
        "leank_eager_ms": leank["eager_ms"], "eager_speedup": sdpa["eager_ms"] / leank["eager_ms"],
        "floor_ratio": sdpa["bytes"] / leank["bytes"], "leank_GBps": leank["bytes"] / leank["ms"] / 1e6,
        "leank_step_GBps": leank["step_bytes"] / leank["step_ms"] / 1e6, "leank_MB": leank["bytes"] / 1e6,
        "leank_ms_min_layer": leank["ms_min_layer"], "leank_ms_max_layer": leank["ms_max_layer"],
    }  # fmt: skip


def bench_shape(
    masks: LeanKMasks, batch: int, context: int, sink: int, recent: int, timer: Timer, kv_bits: tuple[int, ...] = (),
    layers: list[int] | None = None,
) -> tuple[dict, dict[str, dict]]:  # fmt: skip
    """SDPA and LeanK (averaged over `layers`' masks, by default every layer's) at one shape, LeanK's middle in the
    model's dtype and, for each of `kv_bits`, quantized; times in ms. Returns the row (the CSV's columns: LeanK's
    unquantized, then `int8_*`/`int4_*`) and LeanK's columns by middle ("bf16", "int8", ...; `versus_sdpa`)."""
    layers = list(range(masks.num_layers)) if layers is None else layers
    scaling = HEAD_DIM**-0.5
    query = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device=timer.device, dtype=timer.dtype)
    sdpa = bench_sdpa(query, context, scaling, timer, len(layers))
    torch.cuda.empty_cache()
    middles = {}
    for bits in (None, *kv_bits):
        build = functools.partial(
            leank_cache, batch=batch, context=context, sink=sink, recent=recent, bits=bits, device=timer.device,
            dtype=timer.dtype,
        )  # fmt: skip
        leank = bench_leank(query, scaling, timer, lambda layer, build=build: build(masks.channel_mask[layer]), layers)
        middles["bf16" if bits is None else f"int{bits}"] = versus_sdpa(sdpa, leank)
        torch.cuda.empty_cache()
    ours = middles["bf16"]
    row = {
        "batch": batch, "context": context, "sink": sink, "recent": recent, "sdpa_backend": sdpa["backend"],
        "sdpa_ms": sdpa["ms"], "leank_ms": ours["leank_ms"], "speedup": ours["speedup"],
        "sdpa_step_ms": sdpa["step_ms"], "leank_step_ms": ours["leank_step_ms"],
        "step_speedup": ours["step_speedup"],
        "dirty_speedup": ours["dirty_speedup"],
        "sdpa_eager_ms": sdpa["eager_ms"], "leank_eager_ms": ours["leank_eager_ms"],
        "eager_speedup": ours["eager_speedup"],
        "floor_ratio": ours["floor_ratio"],
        "sdpa_GBps": sdpa["bytes"] / sdpa["ms"] / 1e6, "leank_GBps": ours["leank_GBps"],
        "sdpa_step_GBps": sdpa["bytes"] / sdpa["step_ms"] / 1e6,
        "leank_step_GBps": ours["leank_step_GBps"],
        "leank_ms_min_layer": ours["leank_ms_min_layer"], "leank_ms_max_layer": ours["leank_ms_max_layer"],
    }  # fmt: skip
    for middle, columns in middles.items():
        if middle != "bf16":
            row.update({f"{middle}_{key}": value for key, value in columns.items()})
    return row, middles


def print_quantized_table(rows: list[dict], middles: list[dict[str, dict]], copy: float) -> None:
    """A row per shape and middle (bf16, then each of `--kv-bits`): LeanK against the same SDPA baseline."""
    print(
        f"\nLeanK over a quantized middle (keys per channel over blocks of {KEY_BLOCK} tokens, values per token in "
        f"groups of {VALUE_GROUP} channels, fp16 scales and zeros; sink and window in bf16), same timings:\n"
    )
    print("| batch | context | sink/recent | middle | SDPA ms | LeanK ms | **speedup** | SDPA ms, step | "
          "LeanK ms, step | **speedup, step** | step vs bf16 middle | dense MB | LeanK MB | byte floor | LeanK GB/s | "
          "LeanK % of copy | LeanK % of copy, step | speedup, dirty L2 | eager speedup |")  # fmt: skip
    print("|---" * 19 + "|")
    for r, by_middle in zip(rows, middles, strict=True):
        for middle, m in by_middle.items():
            print(f"| {r['batch']} | {r['context']} | {r['sink']}/{r['recent']} | {middle} | {r['sdpa_ms']:.4f} | "
                  f"{m['leank_ms']:.4f} | **{m['speedup']:.2f}x** | {r['sdpa_step_ms']:.4f} | "
                  f"{m['leank_step_ms']:.4f} | **{m['step_speedup']:.2f}x** | "
                  f"{by_middle['bf16']['leank_step_ms'] / m['leank_step_ms']:.2f}x | "
                  f"{m['leank_MB'] * m['floor_ratio']:.1f} | {m['leank_MB']:.1f} | {m['floor_ratio']:.2f}x | "
                  f"{m['leank_GBps']:.0f} | {100 * m['leank_GBps'] * 1e9 / copy:.0f}% | "
                  f"{100 * m['leank_step_GBps'] * 1e9 / copy:.0f}% | {m['dirty_speedup']:.2f}x | "
                  f"{m['eager_speedup']:.2f}x |")  # fmt: skip


def kv_bits_list(text: str) -> tuple[int, ...]:
    """`--kv-bits`: comma-separated bit widths, each 8 or 4."""
    bits = tuple(int(part) for part in text.split(",") if part)
    if not bits or set(bits) - {4, 8}:
        raise argparse.ArgumentTypeError(f"expected 8 and/or 4, comma-separated, got {text!r}")
    return bits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", default="llama-3.1-8b-instruct")
    parser.add_argument("--shapes", default="1x32768,1x131072,8x32768,32x8192", help="BATCHxCONTEXT,...")
    parser.add_argument("--windows", default="64/256,128/768", help="SINK/RECENT,...")
    parser.add_argument(
        "--kv-bits", type=kv_bits_list, default=(), help="also time the middle quantized to these bits, e.g. 8,4"
    )
    parser.add_argument("--csv", help="append the rows (with device, versions, git SHA, date) to this CSV")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="check the script on the CPU (needs TRITON_INTERPRET=1): two layers, every call once, nothing timed",
    )  # fmt: skip
    args = parser.parse_args()
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--dry-run runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")

    masks = LeanKMasks.from_pretrained(args.masks)
    timer = DryRunTimer() if args.dry_run else Timer()
    layers = [0, masks.num_layers // 2] if args.dry_run else None
    copy = timer.copy_bandwidth()
    rows, middles = [], []
    for window in args.windows.split(","):
        sink, recent = (int(x) for x in window.split("/"))
        for shape in args.shapes.split(","):
            batch, context = (int(x) for x in shape.split("x"))
            row, by_middle = bench_shape(masks, batch, context, sink, recent, timer, args.kv_bits, layers)
            rows.append(row)
            middles.append(by_middle)
            torch.cuda.empty_cache()

    name = timer.device_name()
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
    if args.kv_bits:
        print_quantized_table(rows, middles, copy)
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
