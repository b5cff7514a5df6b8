"""End to end: `model.generate` with LeanKCache vs the stock DynamicCache (SDPA), Llama-3.1-8B config, random weights.

Issue 24's runs (a quantized middle; not run yet: BENCHMARKS.md, "Issue 24 GPU runs", says what each checks, how
long it should take and in which order). Compiled decoding at 32K x 4, int4 against bf16 LeanK and the baselines:

    taskset -c 2 python benchmarks/generate.py --prompt 32768 --batch 4 --repeats 3 \
        --setups DynamicCache:flash,LeanKCache-static:flash,LeanKCache-int4-static:flash,QuantizedCache-int4:flash

Largest batch, prefill chunked for every cache; one search per cache, each bracketed by a guess (--batch expected
to fit, --upper-batch expected not to; at 4K int4's top is the target, 2.5 x 80); at 32K first whether int4 fits 3x
the DynamicCache's largest batch (39 = 3 x 13: put in the measured one), the whole search after it if time is left:

    G="python benchmarks/generate.py --skip-equal-batch --sdpa-backends default --prefill-chunk 1024"
    $G --find-max-batch --prompt 4096 --caches DynamicCache --batch 78 --upper-batch 82
    $G --find-max-batch --prompt 4096 --caches LeanKCache-int4 --batch 176 --upper-batch 200
    $G --find-max-batch --prompt 32768 --caches DynamicCache --batch 12 --upper-batch 15
    $G --check-batch --prompt 32768 --caches LeanKCache-int4 --batch 39
    $G --find-max-batch --prompt 32768 --caches LeanKCache-int4 --batch 56 --upper-batch 68

Then, as time allows: int8 and transformers' QuantizedCache (which needs optimum-quanto or hqq carried as wheels):

    taskset -c 2 python benchmarks/generate.py --prompt 32768 --batch 4 --repeats 3 \
        --setups DynamicCache:flash,LeanKCache-int8-static:flash,LeanKCache-int4:flash,QuantizedCache-int8:flash
    $G --find-max-batch --prompt 4096 --caches LeanKCache-int8 --batch 144 --upper-batch 164
    $G --find-max-batch --prompt 4096 --caches QuantizedCache-int4 --batch 120 --upper-batch 250

For each cache and each SDPA backend (`--sdpa-backends`; prefill attends through SDPA with either cache, decode too
with DynamicCache): KV/activation peak memory above the weights, prefill time, decode tokens/s (all rows, 128 new
tokens forced), and optionally the largest batch that fits. Decode is timed inside the one generate call on the GPU's
clock (`StepClock`: an event each time generate scores a token), so host-bound gaps count and no prefill-only run is
subtracted. The summary compares the fastest setup (SDPA backend) of each cache.
Caches (`--caches`, `--setups`): `DynamicCache`; `StaticCache`; `LeanKCache`, with `-int8` or `-int4` for a middle
stored in 8 or 4 bits (`kv_bits`, default `q_group_size`) and `-static` for `max_cache_len`, in that order
(`LeanKCache-int4-static`); and transformers' `QuantizedCache-int4` / `-int8` (KIVI-style: `nbits`, `q_group_size` 64,
`residual_length` = the masks' sink + recent, the full-width tokens LeanK keeps; transformers' default axes) on the
first backend that builds here, optimum-quanto (int4 only) then hqq (int4, int8), or the one named
(`QuantizedCache-hqq-int4`). A QuantizedCache no backend builds is left out with one line saying so.
`LeanKCache-static` (a LeanKCache with `max_cache_len`) and `StaticCache` keep fixed-size stores, so `generate`
compiles their decode steps (torch.compile, mode reduce-overhead: CUDA graphs); the warm-up runs at the measured
shape, so compilation stays out of the numbers.
PyTorch's default dispatch picks cuDNN attention on an H100, which builds a new execution plan for every new key
length, so every decode step of a DynamicCache pays for plans; forcing flash attention avoids that, and the fastest
run is the baseline. Random weights make the text meaningless but the work real. Decoding here is host-bound and
the lent machines' hosts are noisy (the same run varies by up to ~30 %), so each setup runs `--repeats` times,
interleaved with the others, and the tables give medians.

`--dry-run` checks the setups on the CPU: a tiny model with the config's layers and KV heads (so the masks fit), fp32,
one short generate per cache (prefill chunked if `--prefill-chunk` is given, SDPA's own choice), nothing timed.

    python benchmarks/generate.py --prompt 4096 --batch 16 [--find-max-batch]
    python benchmarks/generate.py --prompt 32768 --batch 4
    python benchmarks/generate.py --dry-run --setups LeanKCache-int4-static:flash,QuantizedCache-int4:flash
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    QuantizedCache,
    StaticCache,
)

from leank_hf import LeanKCache, LeanKMasks
from leank_hf.compat import cache_kwargs

LLAMA_31_8B = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "rms_norm_eps": 1e-5,
}  # fmt: skip
# `--dry-run`'s model: the same layers, KV heads and head_dim (the masks must fit), tiny otherwise.
TINY = {**LLAMA_31_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8}
# transformers' QuantizedCache backends, in the order tried, and the bits each takes (of the 8 and 4 named here).
QUANTIZED_BACKENDS = {"quanto": (4,), "hqq": (4, 8)}
QUANTIZED_GROUP = 64  # QuantizedCache's q_group_size: its default and the library's


def build_model(config: dict = LLAMA_31_8B, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config))
    torch.set_default_dtype(torch.float32)
    return model.eval()


class CacheName(NamedTuple):
    """A cache name of this script, parsed (see the module's docstring)."""

    base: str  # DynamicCache, StaticCache, LeanKCache or QuantizedCache
    bits: int | None  # kv_bits (LeanKCache) or nbits (QuantizedCache)
    static: bool  # LeanKCache with max_cache_len
    backend: str | None  # QuantizedCache's, when named

    @classmethod
    def parse(cls, name: str) -> CacheName:
        base, *parts = name.split("-")
        static = parts[-1:] == ["static"]
        parts = parts[:-1] if static else parts
        bits = int(parts.pop()[3:]) if parts[-1:] in (["int8"], ["int4"]) else None
        backend = parts.pop() if base == "QuantizedCache" and parts[-1:] and parts[-1] in QUANTIZED_BACKENDS else None
        known = not parts and (
            (base in ("DynamicCache", "StaticCache") and bits is None and not static)
            or base == "LeanKCache"
            or (base == "QuantizedCache" and bits is not None and not static)
        )
        if not known:
            raise ValueError(
                f"unknown cache {name!r}; use DynamicCache, StaticCache, LeanKCache[-int8|-int4][-static] or "
                f"QuantizedCache[-{'|-'.join(QUANTIZED_BACKENDS)}]-int4|-int8"
            )
        return cls(base, bits, static, backend)


def quantized_cache(config, masks: LeanKMasks, bits: int, backend: str) -> QuantizedCache:
    """transformers' QuantizedCache as the module's docstring says."""
    return QuantizedCache(
        backend=backend, config=config, nbits=bits, q_group_size=QUANTIZED_GROUP,
        residual_length=masks.sink + masks.recent,
    )  # fmt: skip


def names_run_as(kinds: list[str], masks: LeanKMasks) -> dict[str, str]:
    """The name each cache of `kinds` runs under: its own, or for a QuantizedCache the backend's that builds here
    (`QuantizedCache-int4` becomes `QuantizedCache-quanto-int4` where optimum-quanto is installed). A QuantizedCache
    that no backend builds is left out, with one line saying so."""
    names = {}
    for kind in kinds:
        name = CacheName.parse(kind)
        if name.base != "QuantizedCache":
            names[kind] = kind
            continue
        tried = [name.backend] if name.backend else [b for b, bits in QUANTIZED_BACKENDS.items() if name.bits in bits]
        failures = []
        for backend in tried:
            try:
                quantized_cache(LlamaConfig(**LLAMA_31_8B), masks, name.bits, backend)
            except (ImportError, ValueError) as error:
                failures.append(f"{backend}: {str(error).split('. ')[0]}")
                continue
            names[kind] = f"QuantizedCache-{backend}-int{name.bits}"
            break
        else:
            print(f"skipping {kind}: no backend of transformers' QuantizedCache builds here ({'; '.join(failures)})")
    return names


def make_cache(kind: str, model, masks: LeanKMasks, max_cache_len: int):
    """A fresh cache of the kind named (see the module's docstring); fixed-size ones (`StaticCache`, `-static`) hold
    `max_cache_len` tokens per row."""
    name = CacheName.parse(kind)
    if name.base == "DynamicCache":
        return DynamicCache(config=model.config)
    if name.base == "StaticCache":
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    if name.base == "LeanKCache":
        return LeanKCache(masks, model, kv_bits=name.bits, max_cache_len=max_cache_len if name.static else None)
    return quantized_cache(model.config, masks, name.bits, name.backend)


def sdpa_backend(name: str) -> contextlib.AbstractContextManager:
    """`default` (PyTorch's own dispatch) or the `SDPBackend`s a name allows, joined by `+`: `flash`, `cudnn`,
    `efficient`, `math`. A fixed-size cache needs two: its prefill passes no mask and shares K/V heads (GQA), which
    flash takes and memory-efficient does not; its decode steps pass a mask over the whole static length, which
    memory-efficient takes and flash does not."""
    if name == "default":
        return contextlib.nullcontext()
    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    parts = name.split("+")
    unknown = sorted(set(parts) - set(names))
    if unknown:
        raise ValueError(f"unknown SDPA backend {'+'.join(unknown)!r}; use default or {sorted(names)} joined by +")
    return sdpa_kernel([names[part] for part in parts])


class StepClock(LogitsProcessor):
    """Marks the GPU timeline each time `generate` scores a next token: once after the prefill, then once per decode
    step. Decode time is then measured inside the one generate call, on the GPU's clock (a host-bound step shows as
    the gap between two marks), with no prefill-only run to subtract."""

    def __init__(self) -> None:
        self.marks: list[torch.cuda.Event] = []
        self.prefill_peak = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.marks:  # every allocation of the prefill has been made by the time the host gets here
            self.prefill_peak = torch.cuda.max_memory_allocated()
        mark = torch.cuda.Event(enable_timing=True)
        mark.record()
        self.marks.append(mark)
        return scores

    def step_seconds(self) -> list[float]:
        """Seconds between consecutive marks: one entry per decode step (call after synchronising)."""
        return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]


def generate(
    model, masks, kind: str, ids: torch.Tensor, new_tokens: int, prefill_chunk: int | None, max_cache_len: int,
    processors: tuple[LogitsProcessor, ...] = (),
) -> torch.Tensor:  # fmt: skip
    """One greedy generate call of exactly `new_tokens` tokens per row on a fresh cache of the kind named."""
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), **cache_kwargs(make_cache(kind, model, masks, max_cache_len)),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        prefill_chunk_size=prefill_chunk, logits_processor=LogitsProcessorList(processors),
    )  # fmt: skip


def run(
    model, masks, kind: str, batch: int, prompt: int, new_tokens: int, prefill_chunk: int | None = None,
    sdpa: str = "default", max_cache_len: int | None = None,
) -> dict:  # fmt: skip
    """Prefill time, decode steps' times and peak memory of one generate call (fixed-size caches sized for
    `max_cache_len` tokens, by default the prompt and the new tokens)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()
    clock = StepClock()
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    with torch.no_grad(), sdpa_backend(sdpa):
        generate(model, masks, kind, ids, new_tokens, prefill_chunk, max_cache_len or prompt + new_tokens, (clock,))
    torch.cuda.synchronize()
    steps = clock.step_seconds()
    decode = sum(steps)
    return {
        "cache": kind, "sdpa": sdpa, "batch": batch, "prompt": prompt,
        "prefill_s": start.elapsed_time(clock.marks[0]) / 1e3, "decode_s": decode,
        "decode_tok_s": batch * len(steps) / decode, "step_ms": statistics.median(steps) * 1e3,
        "slowest_step_ms": max(steps) * 1e3,
        "peak_gib": (torch.cuda.max_memory_allocated() - weights) / 2**30,
        "prefill_peak_gib": (clock.prefill_peak - weights) / 2**30,
    }  # fmt: skip


def median_run(runs: list[dict]) -> dict:
    """One row for repeated runs of a setup: the median of each timing, the largest peak memory."""
    row = dict(runs[0])
    for key in ("prefill_s", "decode_s", "decode_tok_s", "step_ms", "slowest_step_ms"):
        row[key] = statistics.median(r[key] for r in runs)
    for key in ("peak_gib", "prefill_peak_gib"):
        row[key] = max(r[key] for r in runs)
    row["decode_tok_s_runs"] = [r["decode_tok_s"] for r in runs]
    return row


def fits(
    model, masks, kind: str, batch: int, prompt: int, new_tokens: int, prefill_chunk: int | None, sdpa: str
) -> bool:
    try:
        run(model, masks, kind, batch, prompt, new_tokens, prefill_chunk, sdpa)
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    torch.cuda.empty_cache()
    print(f"  {kind} batch {batch}: {'fits' if ok else 'out of memory'}", flush=True)
    return ok


def max_batch(
    model, masks, kind: str, prompt: int, new_tokens: int, start: int, prefill_chunk: int | None, sdpa: str,
    upper: int | None = None,
) -> int:  # fmt: skip
    """Largest batch whose whole generate call fits: doubling from `start` (first straight to `upper`, a batch
    expected not to fit, when given), then bisection."""
    low, high = 0, start

    def fits_at(batch: int) -> bool:
        return fits(model, masks, kind, batch, prompt, new_tokens, prefill_chunk, sdpa)

    while fits_at(high):
        low, high = high, upper if upper is not None and upper > high else high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits_at(middle) else (low, middle)
    return low


def dry_run(masks: LeanKMasks, setups: list[tuple[str, str]], prefill_chunk: int | None) -> None:
    """`--dry-run`: each setup's cache through one generate call of a tiny model on the CPU (see the docstring), with a
    few new tokens after a prompt of 1K tokens: long enough that a LeanKCache with `max_cache_len` prunes (with the
    shipped windows, one of ~800 tokens or less keeps full keys instead, with a warning)."""
    model = build_model(TINY, device="cpu", dtype=torch.float32)
    prompt, new_tokens = 1024, 4
    chunk = None if prefill_chunk is None else masks.block_size
    print(f"dry run on the CPU: tiny model ({TINY['num_hidden_layers']} layers, {TINY['num_key_value_heads']} KV "
          f"heads, head_dim {TINY['head_dim']}), fp32, batch 2, prompt {prompt}, {new_tokens} new tokens, prefill "
          f"chunk {chunk}; SDPA's own choice on the CPU")  # fmt: skip
    for kind, sdpa in setups:
        ids = torch.randint(0, model.config.vocab_size, (2, prompt))
        with torch.no_grad():
            out = generate(model, masks, kind, ids, new_tokens, chunk, prompt + new_tokens)
        assert out.shape == (2, prompt + new_tokens), out.shape
        print(f"  {kind} (SDPA {sdpa} on the GPU): ok", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--masks", default="llama-3.1-8b-instruct")
    parser.add_argument(
        "--find-max-batch", action="store_true", help="search the largest batch of each cache that fits (see --batch)"
    )
    parser.add_argument(
        "--upper-batch", type=int, help="a batch expected not to fit: the search tries it after --batch, then bisects"
    )
    parser.add_argument("--prefill-chunk", type=int, help="generate's prefill_chunk_size (every cache)")
    parser.add_argument(
        "--check-batch", action="store_true",
        help="instead of searching the largest batch, try --batch once per cache (whether a target batch fits)",
    )  # fmt: skip
    parser.add_argument("--skip-equal-batch", action="store_true", help="only search the largest batch")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setup at equal batch (medians)")
    parser.add_argument(
        "--caches", default="DynamicCache,LeanKCache",
        help="caches to run, comma-separated, e.g. DynamicCache,LeanKCache-int4,QuantizedCache-int4 (see above)",
    )  # fmt: skip
    parser.add_argument(
        "--setups",
        help="cache:SDPA-backend pairs, comma-separated (instead of every cache with "
        "every backend), e.g. DynamicCache:flash,LeanKCache-static:flash,StaticCache:efficient+flash",
    )
    parser.add_argument("--sdpa-backends", default="default,flash",
                        help="SDPA backends to run each cache with (default = PyTorch's dispatch); the largest-batch "
                             "search uses the first (with --setups: each cache's first backend there)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="check the setups on the CPU (a tiny model, no timing)")
    args = parser.parse_args()

    backends = tuple(args.sdpa_backends.split(","))
    kinds = tuple(args.caches.split(","))
    setups = [(kind, sdpa) for kind in kinds for sdpa in backends]
    if args.setups:
        setups = [tuple(setup.split(":")) for setup in args.setups.split(",")]
    # The largest-batch search (or --check-batch): each cache of --setups with its first backend there, else --caches
    # with the first.
    searched = {kind: backends[0] for kind in kinds}
    if args.setups:
        searched = {}
        for kind, sdpa in setups:
            searched.setdefault(kind, sdpa)
    try:  # a misspelt cache or backend fails here, not after the model is built and warmed up
        for kind, sdpa in [*setups, *searched.items()]:
            sdpa_backend(sdpa)
            name = CacheName.parse(kind)
            if args.prefill_chunk and name.base == "LeanKCache" and name.static:
                raise ValueError(f"{kind}: a LeanKCache with max_cache_len refuses chunked prefill (--prefill-chunk)")
    except ValueError as error:
        parser.error(str(error))
    masks = LeanKMasks.from_pretrained(args.masks)
    searched = searched if args.find_max_batch or args.check_batch else {}
    runs_as = names_run_as(list(dict.fromkeys([*(kind for kind, _ in setups), *searched])), masks)
    setups = [(runs_as[kind], sdpa) for kind, sdpa in setups if kind in runs_as]
    searched = {runs_as[kind]: sdpa for kind, sdpa in searched.items() if kind in runs_as}
    if args.dry_run:
        dry_run(masks, list(dict.fromkeys([*setups, *searched.items()])), args.prefill_chunk)
        return
    model = build_model()
    rows = []
    if not args.skip_equal_batch:
        for kind, sdpa in setups:  # warm-up at the measured shape: compilation stays out of the numbers
            run(
                model, masks, kind, args.batch, args.prompt, 8, args.prefill_chunk, sdpa,
                max_cache_len=args.prompt + args.new_tokens,
            )  # fmt: skip
        runs = {setup: [] for setup in setups}
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the host hits every setup alike
            for kind, sdpa in setups:
                runs[kind, sdpa].append(
                    run(model, masks, kind, args.batch, args.prompt, args.new_tokens, args.prefill_chunk, sdpa)
                )
        rows = [median_run(setup_runs) for setup_runs in runs.values()]
    print(f"\n{torch.cuda.get_device_name()}; torch {torch.__version__}; Llama-3.1-8B config, random bf16 weights; "
          f"masks {args.masks} (sink {masks.sink} / recent {masks.recent}); {args.new_tokens} new tokens; "
          f"prefill chunk {args.prefill_chunk}\n")  # fmt: skip
    if rows:
        print(f"medians of {args.repeats} runs\n")
        print("| cache | SDPA | batch | prompt | prefill s | decode s | decode tok/s | each run's decode tok/s | "
              "median step ms | slowest step ms | peak GiB above weights | prefill peak GiB |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            each = ", ".join(f"{value:.1f}" for value in r["decode_tok_s_runs"])
            print(f"| {r['cache']} | {r['sdpa']} | {r['batch']} | {r['prompt']} | {r['prefill_s']:.2f} | "
                  f"{r['decode_s']:.2f} | {r['decode_tok_s']:.1f} | {each} | {r['step_ms']:.1f} | "
                  f"{r['slowest_step_ms']:.1f} | {r['peak_gib']:.2f} | {r['prefill_peak_gib']:.2f} |")  # fmt: skip
    fastest = {}  # cache -> its setup with the most decode tokens/s (medians)
    for r in rows:
        if r["decode_tok_s"] > fastest.get(r["cache"], {}).get("decode_tok_s", 0):
            fastest[r["cache"]] = r
    # Every cache against DynamicCache; LeanK's against the other baselines too, and a quantized middle against the
    # same LeanKCache unquantized.
    baselines = [name for name in fastest if not name.startswith("LeanKCache")]
    baselines.sort(key=lambda name: name != "DynamicCache")
    pairs = [
        (name, base_name) for base_name, name in itertools.product(baselines, fastest)
        if name not in (base_name, "DynamicCache") and (base_name == "DynamicCache" or name.startswith("LeanKCache"))
    ]  # fmt: skip
    for name in fastest:
        parsed = CacheName.parse(name)
        twin = "LeanKCache-static" if parsed.static else "LeanKCache"
        if parsed.base == "LeanKCache" and parsed.bits and twin in fastest:
            pairs.append((name, twin))
    for name, base_name in pairs:
        base, other = fastest[base_name], fastest[name]
        print(f"{name} (SDPA {other['sdpa']}) / {base_name} (SDPA {base['sdpa']}), the fastest setup of each cache "
              f"(medians): peak memory {other['peak_gib'] / base['peak_gib']:.2f}x, decode tok/s "
              f"{other['decode_tok_s'] / base['decode_tok_s']:.2f}x, median step time "
              f"{other['step_ms'] / base['step_ms']:.2f}x, prefill time "
              f"{other['prefill_s'] / base['prefill_s']:.2f}x")  # fmt: skip
    if args.check_batch:
        fitting = {
            kind: fits(model, masks, kind, args.batch, args.prompt, args.new_tokens, args.prefill_chunk, sdpa)
            for kind, sdpa in searched.items()
        }  # fmt: skip
        print(f"\nbatch {args.batch} ({args.prompt} prompt + {args.new_tokens} new tokens, prefill chunk "
              f"{args.prefill_chunk}) fits: {fitting}")  # fmt: skip
    elif args.find_max_batch:
        largest = {
            kind: max_batch(model, masks, kind, args.prompt, args.new_tokens, args.batch, args.prefill_chunk, sdpa,
                            args.upper_batch)
            for kind, sdpa in searched.items()
        }  # fmt: skip
        dense = largest.get("DynamicCache")
        ratios = [f"{kind} {rows / max(dense, 1):.2f}x" for kind, rows in largest.items() if kind != "DynamicCache"]
        ratio = f" (vs DynamicCache: {', '.join(ratios)})" if dense is not None and ratios else ""
        print(
            f"\nlargest batch that fits ({args.prompt} prompt + {args.new_tokens} new tokens, prefill chunk "
            f"{args.prefill_chunk}): {largest}{ratio}"
        )


if __name__ == "__main__":
    main()
