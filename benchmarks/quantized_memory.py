"""Bytes a `LeanKCache` really holds with its middle in 8 or 4 bits, against a bf16 `DynamicCache` (issue 24, target
1: at 32K tokens int8 <= 0.32x and int4 <= 0.20x), on the CPU: memory is counted in exact bytes, the same on any device.

The model is Llama-3.1-8B's config (32 layers, 32 query heads, 8 KV heads, head_dim 128) built on the meta device, so
no weights are allocated; the masks are the paper's (`llama-3.1-8b-instruct`: sink 64, recent 256, block 64). Each
cache is filled layer by layer as `generate` fills it, with random bf16 keys and values (bytes do not depend on them):
`update` with a prompt of `context - new_tokens` tokens, stored by `commit` (what the attention function does after
the exact prefill), then `--new-tokens` decode steps of one token each, stored by `attend` (pruned attention through
the PyTorch reference), so that every row holds `context` tokens. 65 new tokens cross the window's first flush (64
steps): the window has its decode room (`recent + block_size` slots) and the middle has grown once past the prompt
(by 1/16 of its size, capacity that later flushes fill). `memory_report()` then counts what is held: codes, fp16
scales and zeros, the kept keys of a partly filled block (`tail_keys`), sink and window, flags, reserved capacity.

Rows, for each context:
- `DynamicCache`: 2 * layers * kv_heads * head_dim * tokens * 2 bytes (bf16), computed, not allocated (128K tokens
  would take 16 GiB); the formula is checked against one real `DynamicLayer` filled the same way.
- `LeanKCache`, kv_bits None / 8 / 4 (q_group_size default: 64), with `estimate_memory`'s figure for the same tokens
  (what `leank-hf inspect --context N --kv-bits B` prints). The estimate counts `sink + recent` tokens at full width
  and the rest as middle tokens, and no flags or reserve; the measured bytes also hold the window's decode room, the
  middle's growth reserve and the flags (`reserved` and `other` columns).
- `QuantizedCache` (transformers', `backend="quanto"`, nbits 4, q_group_size 64, residual_length = sink + recent),
  when `optimum-quanto` is installed (it is not a dependency of this project: `pip install optimum-quanto`): the bytes
  of every tensor its layers hold (quanto's codes, scales and shifts, and the bf16 residual). The new tokens go to it
  in one `update` of `new_tokens` tokens: they all land in its bf16 residual (fewer than `residual_length`), as they
  would one by one, and each of its decode updates dequantizes the whole layer (minutes on the CPU at 32K). quanto
  has no 8-bit KV type (nbits 2 or 4), so there is no int8 row. Its first use compiles quanto's C++ extension (about
  two minutes, once per machine).
- `StaticCache` of `max_cache_len = context` (computed as above, checked against one real `StaticLayer`) and
  `LeanKCache(max_cache_len=context)` for each kv_bits: fixed-size stores, made when the prompt is stored. Their
  shapes never change afterwards, so they take only `--fixed-steps` decode steps (the script checks that the bytes
  held did not change); the reserve is the middle slots of positions not reached yet.

A decode step through the PyTorch reference over 32K tokens takes ~0.3 s per layer on 2 CPU cores (bf16 matrix
products have no fast path on a CPU without bf16 instructions), so 65 steps of 32 layers take about 10 minutes per
growable cache at 32K. `--step-tokens 64` feeds the first 64 new tokens as one step (as a speculative-decoding
verification step does) and gives the same stores, faster for the quantized caches.

    python benchmarks/quantized_memory.py                               # 32K tokens
    python benchmarks/quantized_memory.py --contexts 4096,32768,131072
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from generate import LLAMA_31_8B
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.cache_utils import DynamicLayer, StaticLayer

from leank_hf import LeanKCache, LeanKMasks, ModelSpec
from leank_hf.kv_quantization import KVQuantization
from leank_hf.memory import MemoryReport, estimate_memory

HERE = Path(__file__).resolve().parent
GIB, MIB = 2**30, 2**20
DTYPE = torch.bfloat16


@dataclasses.dataclass
class Row:
    """One cache at one context: bytes held and against what."""

    cache: str
    context: int
    held: int
    key: int
    value: int
    other: int
    reserved: int
    baseline: int  # the DynamicCache's bytes for the same tokens, or the StaticCache's of the same max_cache_len
    estimate: int | None = None
    prompt_ratio: float | None = None  # bytes held right after the prompt, against the baseline of the prompt
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.held / self.baseline


def build_model() -> PreTrainedModel:
    """Llama-3.1-8B's config on the meta device: the cache reads its geometry, no weight is allocated."""
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA_31_8B))


def dense_bytes(spec: ModelSpec, batch: int, tokens: int) -> int:
    """A bf16 DynamicCache holding `tokens` per row (or a StaticCache of `max_cache_len = tokens`)."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * tokens * batch * DTYPE.itemsize


def random_tokens(generator: torch.Generator, batch: int, heads: int, count: int, head_dim: int) -> torch.Tensor:
    return torch.randn(batch, heads, count, head_dim, generator=generator, dtype=DTYPE)


def steps(new_tokens: int, step_tokens: int) -> list[int]:
    """Sizes of the decode steps: one of `step_tokens` (if more than one) then single tokens."""
    first = min(step_tokens, new_tokens) if step_tokens > 1 else 0
    return ([first] if first else []) + [1] * (new_tokens - first)


def fill_leank(cache: LeanKCache, spec: ModelSpec, batch: int, prompt: int, decode: list[int], seed: int) -> int:
    """Prompt then decode steps, layer after layer, through the layers' API as the LeanK attention function drives
    it. Returns the bytes held right after each layer's prompt, summed."""
    scaling = spec.head_dim**-0.5
    group = LLAMA_31_8B["num_attention_heads"] // spec.num_kv_heads
    after_prompt = 0
    for index, layer in enumerate(cache.layers):
        generator = torch.Generator().manual_seed(seed + index)
        keys, values = (random_tokens(generator, batch, spec.num_kv_heads, prompt, spec.head_dim) for _ in range(2))
        step, _ = cache.update(keys, values, index)
        layer.commit(step, None)  # the exact prefill ran elsewhere: the prompt is stored as it is after it
        del keys, values, step
        after_prompt += layer.memory(index).total_bytes
        for count in decode:
            keys, values = (random_tokens(generator, batch, spec.num_kv_heads, count, spec.head_dim) for _ in range(2))
            query = random_tokens(generator, batch, spec.num_kv_heads * group, count, spec.head_dim)
            step, _ = cache.update(keys, values, index)
            layer.attend(query, step, None, scaling)
        del step
    return after_prompt


def filled(
    model: PreTrainedModel, masks: LeanKMasks, spec: ModelSpec, args: argparse.Namespace, context: int,
    kv_bits: int | None, fixed: bool, decode: list[int],
) -> tuple[MemoryReport, int, int]:  # fmt: skip
    """A LeanKCache filled with a prompt and `decode` steps to `context` tokens (fixed: `max_cache_len = context`):
    its memory report, the bytes it held after the prompt, and the tokens it holds."""
    cache = LeanKCache(masks, model, kv_bits=kv_bits, q_group_size=args.q_group_size,
                       max_cache_len=context if fixed else None)  # fmt: skip
    after_prompt = fill_leank(cache, spec, args.batch, context - args.new_tokens, decode, args.seed)
    return cache.memory_report(), after_prompt, int(cache.get_seq_length())


def leank_row(
    name: str, model: PreTrainedModel, masks: LeanKMasks, spec: ModelSpec, args: argparse.Namespace, context: int,
    kv_bits: int | None, fixed: bool,
) -> Row:  # fmt: skip
    start = time.perf_counter()
    prompt = context - args.new_tokens
    decode = [1] * args.fixed_steps if fixed else steps(args.new_tokens, args.step_tokens)
    report, after_prompt, tokens = filled(model, masks, spec, args, context, kv_bits, fixed, decode)
    if tokens != prompt + sum(decode):
        raise RuntimeError(f"{name}: the cache holds {tokens} tokens per row, expected {prompt + sum(decode)}")
    baseline = dense_bytes(spec, args.batch, context)
    if report.dense_bytes != (baseline if fixed else dense_bytes(spec, args.batch, tokens)):
        raise RuntimeError(f"{name}: memory_report's {report.baseline} bytes {report.dense_bytes} != {baseline}")
    if fixed and report.total_bytes != after_prompt:
        raise RuntimeError(f"{name}: fixed stores changed size in decode ({after_prompt} -> {report.total_bytes})")
    quantization = KVQuantization(kv_bits, args.q_group_size)
    estimate = estimate_memory(
        masks.channel_mask, masks.pruned_layers, masks.sink, masks.recent, context, args.batch, DTYPE.itemsize,
        quantization, masks.block_size,
    ).total_bytes  # fmt: skip
    prompt_baseline = baseline if fixed else dense_bytes(spec, args.batch, prompt)
    return row_of(name, context, report, baseline, estimate, after_prompt / prompt_baseline, start)


def check_step_tokens(
    model: PreTrainedModel, masks: LeanKMasks, spec: ModelSpec, args: argparse.Namespace, context: int,
    bits: list[int | None],
) -> str:  # fmt: skip
    """Fill each growable LeanKCache at `context` both ways, the first new tokens as one step of `--step-tokens` and
    one token per step, and check that every layer's memory report is the same."""
    for kv_bits in bits:
        chunked = filled(model, masks, spec, args, context, kv_bits, False, steps(args.new_tokens, args.step_tokens))
        single = filled(model, masks, spec, args, context, kv_bits, False, [1] * args.new_tokens)
        if chunked[0].layers != single[0].layers:
            raise RuntimeError(f"kv_bits={kv_bits}: one-token steps leave other stores than --step-tokens")
    return (
        f"checked at {context} tokens: one-token decode steps leave the same bytes (every field of every layer's "
        f"memory report) as --step-tokens {args.step_tokens}, for kv_bits {', '.join(map(str, bits))}."
    )


def row_of(
    name: str, context: int, report: MemoryReport, baseline: int, estimate: int | None, prompt_ratio: float | None,
    start: float,
) -> Row:  # fmt: skip
    return Row(name, context, report.total_bytes, report.key_bytes, report.value_bytes, report.other_bytes,
               report.reserved_bytes, baseline, estimate, prompt_ratio, time.perf_counter() - start)  # fmt: skip


def held_by(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors`, through tensor subclasses (quanto's) to the plain tensors."""
    storages: dict[int, int] = {}

    def walk(tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                walk(getattr(tensor, name))
        else:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for tensor in tensors:
        if tensor is not None:
            walk(tensor)
    return sum(storages.values())


def check_dense_formulas(spec: ModelSpec, args: argparse.Namespace, context: int) -> None:
    """One real `DynamicLayer` (prompt, then the new tokens) and one `StaticLayer` hold what the formulas say."""
    per_layer = dense_bytes(spec, args.batch, context) // spec.num_layers
    generator = torch.Generator().manual_seed(args.seed)
    layer = DynamicLayer()
    for count in (context - args.new_tokens, args.new_tokens):
        layer.update(*(random_tokens(generator, args.batch, spec.num_kv_heads, count, spec.head_dim) for _ in "kv"))
    held = held_by([layer.keys, layer.values])
    del layer
    static = StaticLayer(max_cache_len=context)
    static.lazy_initialization(*(random_tokens(generator, args.batch, spec.num_kv_heads, 1, spec.head_dim)
                                 for _ in "kv"))  # fmt: skip
    static_held = held_by([static.keys, static.values])
    del static
    if held != per_layer or static_held != per_layer:
        raise RuntimeError(f"a real layer holds {held} (dynamic) / {static_held} (static) bytes, formula {per_layer}")


def quantized_cache_row(model: PreTrainedModel, spec: ModelSpec, masks: LeanKMasks, args: argparse.Namespace,
                        context: int) -> Row:  # fmt: skip
    """transformers' QuantizedCache (quanto, int4), filled with the same tokens."""
    from transformers import QuantizedCache

    start = time.perf_counter()
    residual = masks.sink + masks.recent
    if args.new_tokens >= residual:
        raise SystemExit(f"--new-tokens must stay below QuantizedCache's residual_length {residual}")
    cache = QuantizedCache(backend="quanto", config=model.config, nbits=4, q_group_size=64, residual_length=residual)
    prompt = context - args.new_tokens
    held = key = after_prompt = 0
    for index, layer in enumerate(cache.layers):
        generator = torch.Generator().manual_seed(args.seed + index)
        for count in (prompt, args.new_tokens):
            keys, values = (random_tokens(generator, args.batch, spec.num_kv_heads, count, spec.head_dim) for _ in "kv")
            cache.update(keys, values, index)
            del keys, values
            layer_keys = held_by([layer._quantized_keys, layer.keys])
            layer_held = layer_keys + held_by([layer._quantized_values, layer.values])
            if count == prompt:
                after_prompt += layer_held
        held, key = held + layer_held, key + layer_keys
    if cache.get_seq_length() != context:
        raise RuntimeError(f"QuantizedCache holds {cache.get_seq_length()} tokens, expected {context}")
    baseline = dense_bytes(spec, args.batch, context)
    prompt_ratio = after_prompt / dense_bytes(spec, args.batch, prompt)
    return Row("QuantizedCache (quanto, int4, group 64)", context, held, key, held - key, 0, 0, baseline, None,
               prompt_ratio, time.perf_counter() - start)  # fmt: skip


def quanto_missing() -> str | None:
    """Why transformers' QuantizedCache cannot run here (None: it can)."""
    try:
        importlib.metadata.version("optimum-quanto")
    except importlib.metadata.PackageNotFoundError:
        return "optimum-quanto is not installed (pip install optimum-quanto)"
    return None


def format_table(rows: list[Row]) -> str:
    lines = [
        "| cache | tokens | GiB held | **ratio** | after prompt | K GiB | V GiB | other MiB | reserved MiB | "
        "estimate GiB | estimate ratio | held - estimate MiB | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        estimate = ("-", "-", "-") if row.estimate is None else (
            f"{row.estimate / GIB:.3f}", f"{row.estimate / row.baseline:.3f}x",
            f"{(row.held - row.estimate) / MIB:+.1f}",
        )  # fmt: skip
        after = "-" if row.prompt_ratio is None else f"{row.prompt_ratio:.3f}x"
        lines.append(
            f"| {row.cache} | {row.context} | {row.held / GIB:.3f} | **{row.ratio:.3f}x** | {after} | "
            f"{row.key / GIB:.3f} | {row.value / GIB:.3f} | {row.other / MIB:.2f} | {row.reserved / MIB:.1f} | "
            f"{' | '.join(estimate)} | {row.seconds:.0f} |"
        )
    return "\n".join(lines)


def color(cache: str) -> str:
    """Grey for the stock bf16 caches, green for QuantizedCache, blue and orange for LeanK without and with
    max_cache_len."""
    if cache.startswith(("DynamicCache", "StaticCache")):
        return "0.45"
    if cache.startswith("QuantizedCache"):
        return "C2"
    return "C1" if "max_cache_len" in cache else "C0"


def plot(rows: list[Row], path: Path) -> None:
    """Bars of the bytes held at each context, one panel per context (a `Figure` with an Agg canvas of its own: the
    user's matplotlib backend and pyplot state stay as they are)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    contexts = list(dict.fromkeys(row.context for row in rows))
    figure = Figure(figsize=(6.5 * len(contexts), 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(contexts), squeeze=False)[0]
    for axis, context in zip(axes, contexts, strict=True):
        chosen = [row for row in rows if row.context == context]
        colors = [color(row.cache) for row in chosen]
        bars = axis.bar(range(len(chosen)), [row.held / GIB for row in chosen], color=colors)
        for bar, row in zip(bars, chosen, strict=True):
            axis.annotate(f"{row.ratio:.3f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)  # fmt: skip
        axis.set_xticks(range(len(chosen)), [row.cache.replace(", ", "\n", 1) for row in chosen], rotation=60,
                        ha="right", fontsize=7)  # fmt: skip
        axis.set_ylabel("GiB held (all 32 layers)")
        axis.set_title(f"Llama-3.1-8B config, {context} tokens: bytes held (ratio to its bf16 baseline)", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    figure.savefig(path, dpi=110)


def git_sha() -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "leank_hf", "benchmarks/quantized_memory.py"],
                           capture_output=True, text=True, cwd=HERE.parent).stdout  # fmt: skip
    return sha.strip() + (" + uncommitted changes" if dirty.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="32768", help="tokens each row holds at the end, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=65, help="decode tokens after the prompt (64 cross a flush)")
    parser.add_argument(
        "--step-tokens",
        type=int,
        default=1,
        help="feed the first new tokens as one step of this many (1: one token per step)",
    )
    parser.add_argument(
        "--check-step-tokens",
        action="store_true",
        help="at the first context, also decode one token per step and check the bytes are the same",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default; 1 is much faster on a machine others load)",
    )
    parser.add_argument("--fixed-steps", type=int, default=1, help="decode steps of the max_cache_len caches")
    parser.add_argument("--kv-bits", default="none,8,4", help="LeanK middles to measure: none, 8, 4")
    parser.add_argument("--q-group-size", type=int, default=None, help="value channels per scale (default 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-fixed", action="store_true", help="skip the max_cache_len rows")
    parser.add_argument("--no-quantized-cache", action="store_true", help="skip transformers' QuantizedCache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "quantized_memory_cpu.txt")
    parser.add_argument("--plot", default=str(HERE / "quantized_memory.png"), help="bar plot PNG ('': none)")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    bits = [None if b == "none" else int(b) for b in args.kv_bits.split(",")]
    if args.fixed_steps > args.new_tokens:
        parser.error("--fixed-steps must not exceed --new-tokens (the max_cache_len caches hold `context` tokens)")

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = build_model()
    spec = ModelSpec.from_model(model)
    masks = LeanKMasks.from_pretrained("llama-3.1-8b-instruct")
    missing = None if args.no_quantized_cache else quanto_missing()
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        print(f"  {row.context} tokens, {row.cache}: {row.held / GIB:.3f} GiB, {row.ratio:.3f}x ({row.seconds:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip

    notes = []
    if args.check_step_tokens and args.step_tokens > 1:
        notes.append(check_step_tokens(model, masks, spec, args, contexts[0], bits))
        print(notes[-1], file=sys.stderr, flush=True)
    for context in contexts:
        if context - args.new_tokens < masks.sink + masks.recent + masks.block_size:
            raise SystemExit(f"context {context} is too short: the prompt needs sink + recent + block_size tokens")
        check_dense_formulas(spec, args, context)
        dense = dense_bytes(spec, args.batch, context)
        half = dense // 2
        add(Row("DynamicCache (bf16)", context, dense, half, half, 0, 0, dense, prompt_ratio=1.0))
        for kv_bits in bits:
            add(leank_row(f"LeanKCache, kv_bits={kv_bits}", model, masks, spec, args, context, kv_bits, False))
        if not args.no_quantized_cache and missing is None:
            add(quantized_cache_row(model, spec, masks, args, context))
        if not args.no_fixed:
            add(Row(f"StaticCache (bf16, max_cache_len={context})", context, dense, half, half, 0, 0, dense,
                    prompt_ratio=1.0))  # fmt: skip
            for kv_bits in bits:
                name = f"LeanKCache, kv_bits={kv_bits}, max_cache_len"
                add(leank_row(name, model, masks, spec, args, context, kv_bits, True))

    command = "python benchmarks/quantized_memory.py " + " ".join(sys.argv[1:])
    versions = f"torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}"
    if missing is None and not args.no_quantized_cache:
        versions += f", optimum-quanto {importlib.metadata.version('optimum-quanto')}"
    header = [
        command.strip(),
        f"{datetime.date.today().isoformat()}, CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), "
        f"{versions}, git {git_sha()}; "
        f"{time.perf_counter() - started:.0f} s in all",
        f"Llama-3.1-8B config, masks llama-3.1-8b-instruct (keep {masks.keep_ratio:.4f}, sink {masks.sink}, recent "
        f"{masks.recent}, block {masks.block_size}), batch {args.batch}, bf16; prompt of context - {args.new_tokens} "
        f"tokens, then {args.new_tokens} new tokens (decode steps: {steps(args.new_tokens, args.step_tokens)[:2]}...)"
        f"; max_cache_len rows: {args.fixed_steps} decode step(s), against a StaticCache of max_cache_len = context.",
        "ratio: bytes held / the baseline's (DynamicCache for the same tokens, or the StaticCache); after prompt: the "
        "same right after the prompt was stored; estimate: leank_hf.memory.estimate_memory for `context` tokens.",
    ]
    header += notes
    if missing is not None:
        header.append(f"QuantizedCache: not measured, {missing}.")
    text = "\n".join(header) + "\n\n" + format_table(rows) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"table: {args.out}")
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
