"""End to end: `model.generate` with LeanKCache vs the stock DynamicCache (SDPA), Llama-3.1-8B config, random weights.

For each cache and each SDPA backend (`--sdpa-backends`; prefill attends through SDPA with either cache, decode too
with DynamicCache): KV/activation peak memory above the weights, prefill time, decode tokens/s (all rows, 128 new
tokens forced), and optionally the largest batch that fits. Decode is timed inside the one generate call on the GPU's
clock (`StepClock`: an event each time generate scores a token), so host-bound gaps count and no prefill-only run is
subtracted. The summary compares the fastest setup (SDPA backend) of each cache.
`LeanKCache-static` (a LeanKCache with `max_cache_len`) and `StaticCache` keep fixed-size stores, so `generate`
compiles their decode steps (torch.compile, mode reduce-overhead: CUDA graphs); the warm-up runs at the measured
shape, so compilation stays out of the numbers.
PyTorch's default dispatch picks cuDNN attention on an H100, which builds a new execution plan for every new key
length, so every decode step of a DynamicCache pays for plans; forcing flash attention avoids that, and the fastest
run is the baseline. Random weights make the text meaningless but the work real. Decoding here is host-bound and
the lent machines' hosts are noisy (the same run varies by up to ~30 %), so each setup runs `--repeats` times,
interleaved with the others, and the tables give medians.

    python benchmarks/generate.py --prompt 4096 --batch 16 [--find-max-batch]
    python benchmarks/generate.py --prompt 32768 --batch 4
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList, StaticCache

from leank_hf import LeanKCache, LeanKMasks
from leank_hf.compat import cache_kwargs

LLAMA_31_8B = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "rms_norm_eps": 1e-5,
}  # fmt: skip


def build_model() -> LlamaForCausalLM:
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_31_8B))
    torch.set_default_dtype(torch.float32)
    return model.eval()


def make_cache(kind: str, model, masks: LeanKMasks, max_cache_len: int):
    """`DynamicCache`, `LeanKCache`, or a cache `generate` compiles for: `LeanKCache-static` (a LeanKCache with
    `max_cache_len`) or `StaticCache`."""
    makers = {
        "DynamicCache": lambda: DynamicCache(config=model.config),
        "LeanKCache": lambda: LeanKCache(masks, model),
        "LeanKCache-static": lambda: LeanKCache(masks, model, max_cache_len=max_cache_len),
        "StaticCache": lambda: StaticCache(config=model.config, max_cache_len=max_cache_len),
    }
    if kind not in makers:
        raise ValueError(f"unknown cache {kind!r}; use one of {sorted(makers)}")
    return makers[kind]()


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
        model.generate(
            ids, attention_mask=torch.ones_like(ids),
            **cache_kwargs(make_cache(kind, model, masks, max_cache_len or prompt + new_tokens)),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            prefill_chunk_size=prefill_chunk, logits_processor=LogitsProcessorList([clock]),
        )  # fmt: skip
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--masks", default="llama-3.1-8b-instruct")
    parser.add_argument("--find-max-batch", action="store_true")
    parser.add_argument(
        "--upper-batch", type=int, help="a batch expected not to fit: the search tries it after --batch, then bisects"
    )
    parser.add_argument("--prefill-chunk", type=int, help="generate's prefill_chunk_size (both caches)")
    parser.add_argument("--skip-equal-batch", action="store_true", help="only search the largest batch")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setup at equal batch (medians)")
    parser.add_argument("--caches", default="DynamicCache,LeanKCache", help="caches to run, comma-separated")
    parser.add_argument(
        "--setups",
        help="cache:SDPA-backend pairs, comma-separated (instead of every cache with "
        "every backend), e.g. DynamicCache:flash,LeanKCache-static:flash,StaticCache:efficient+flash",
    )
    parser.add_argument("--sdpa-backends", default="default,flash",
                        help="SDPA backends to run each cache with (default = PyTorch's dispatch); the largest-batch "
                             "search uses the first")  # fmt: skip
    args = parser.parse_args()

    backends = tuple(args.sdpa_backends.split(","))
    for name in backends:  # a misspelt backend fails here, not after the model is built and warmed up
        sdpa_backend(name)
    model = build_model()
    masks = LeanKMasks.from_pretrained(args.masks)
    kinds = tuple(args.caches.split(","))
    setups = [(kind, sdpa) for kind in kinds for sdpa in backends]
    if args.setups:
        setups = [tuple(setup.split(":")) for setup in args.setups.split(",")]
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
    baselines = [name for name in ("DynamicCache", "StaticCache") if name in fastest]
    for base_name, name in itertools.product(baselines, fastest):
        if name == base_name or name == "DynamicCache":
            continue
        base, other = fastest[base_name], fastest[name]
        print(f"{name} (SDPA {other['sdpa']}) / {base_name} (SDPA {base['sdpa']}), the fastest setup of each cache "
              f"(medians): peak memory {other['peak_gib'] / base['peak_gib']:.2f}x, decode tok/s "
              f"{other['decode_tok_s'] / base['decode_tok_s']:.2f}x, median step time "
              f"{other['step_ms'] / base['step_ms']:.2f}x, prefill time "
              f"{other['prefill_s'] / base['prefill_s']:.2f}x")  # fmt: skip
    if args.find_max_batch:
        largest = {
            kind: max_batch(model, masks, kind, args.prompt, args.new_tokens, args.batch, args.prefill_chunk,
                            backends[0], args.upper_batch)
            for kind in kinds
        }  # fmt: skip
        ratio = f" ({largest['LeanKCache'] / max(largest['DynamicCache'], 1):.2f}x)" if len(largest) == 2 else ""
        print(
            f"\nlargest batch that fits ({args.prompt} prompt + {args.new_tokens} new tokens, prefill chunk "
            f"{args.prefill_chunk}): {largest}{ratio}"
        )


if __name__ == "__main__":
    main()
