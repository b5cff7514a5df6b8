"""SmolLM2-135M-Instruct on the CPU: decode speed with LeanKCache vs DynamicCache at a long context.

Greedy, 1 row, a `--prompt`-token prompt, `--new-tokens` forced; the shipped `smollm2-135m-instruct` masks. Prints
median seconds per decoded token over `--repeats` runs (prefill excluded) and the KV memory of each cache.

    python benchmarks/cpu_smollm2.py --prompt 4096 --new-tokens 32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from leank_hf import LeanKCache, LeanKMasks
from leank_hf.compat import cache_kwargs
from leank_hf.embedded import load_embedded_model


def decode_seconds_per_token(model, ids: torch.Tensor, make_cache, new_tokens: int) -> tuple[float, object]:
    """Seconds per token of a greedy decode after a prefill that is timed separately and subtracted."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, **cache_kwargs(make_cache()), max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        cache = make_cache()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
        total = time.perf_counter() - start
    return (total - prefill) / (new_tokens - 1), cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--masks", default="smollm2-135m-instruct")
    args = parser.parse_args()

    model, _ = load_embedded_model(device="cpu")
    masks = LeanKMasks.from_pretrained(args.masks)
    ids = torch.randint(100, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    makers = {"DynamicCache": lambda: DynamicCache(config=model.config), "LeanKCache": lambda: LeanKCache(masks, model)}
    results = {name: [] for name in makers}
    memory = {}
    for _ in range(args.repeats):
        for name, make in makers.items():  # interleaved, so drifts of the machine hit both alike
            seconds, cache = decode_seconds_per_token(model, ids, make, args.new_tokens)
            results[name].append(seconds)
            memory[name] = cache
    report = memory["LeanKCache"].memory_report()
    print(f"\nSmolLM2-135M-Instruct (fp32) on {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
          f"{args.prompt}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}\n")  # fmt: skip
    print("| cache | ms per decoded token | KV cache MiB |\n|---|---|---|")
    mib = {"DynamicCache": report.dense_bytes / 2**20, "LeanKCache": report.total_bytes / 2**20}
    for name, runs in results.items():
        print(f"| {name} | {1000 * statistics.median(runs):.1f} | {mib[name]:.1f} |")
    ratio = statistics.median(results["DynamicCache"]) / statistics.median(results["LeanKCache"])
    print(f"\nLeanK decode speed / DynamicCache: {ratio:.2f}x")


if __name__ == "__main__":
    main()
