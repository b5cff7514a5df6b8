"""Ask SmolLM2-135M-Instruct about a fact buried in a long document, with the full cache and with LeanK.

Run: python examples/long_context_qa.py [--tokens 2500] [--masks smollm2-135m-instruct]

By default the masks are the shipped `smollm2-135m-instruct` repo: learned with `leank-hf train` (two-stage
distillation, `hub_cards/learn_smollm2.sh`). `--calibrate DIR` instead calibrates training-free baseline masks on a
different logbook, saves them as a mask repo in DIR and uses them, to compare.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from leank_hf import LeanKCache, LeanKMasks, calibrated_masks
from leank_hf.compat import cache_kwargs
from leank_hf.embedded import load_embedded_model

SHIPS = ["Albatross", "Morning Star", "Kestrel", "Juniper", "Northern Light", "Saint Brendan", "Halcyon", "Marlin"]
CARGO = ["timber", "salted cod", "copper wire", "wool bales", "coal", "olive oil", "tea chests", "iron nails"]
PORTS = ["Lisbon", "Bergen", "Cork", "Antwerp", "Leith", "Bordeaux", "Hamburg", "Gdansk"]
WEATHER = ["a stiff westerly", "thick fog", "calm seas", "squalls from the north", "a light drizzle", "clear skies"]
EVENTS = [
    "The {ship} arrived from {port} with {n} tons of {cargo}; the crew reported {weather} for most of the crossing.",
    "Repairs to the east quay continued; {n} men worked on the pilings while {weather} slowed the carpenters.",
    "The {ship} was delayed {n} hours at the harbour mouth by {weather} before it could unload its {cargo}.",
    "Customs inspected {n} crates of {cargo} bound for {port} and found the paperwork in order.",
    "A dispute over the price of {cargo} was settled after {n} minutes of argument on the {ship}'s deck.",
    "The lamp on the north breakwater was cleaned and refilled; keepers noted {weather} through the night.",
    "The harbour school took {n} children to watch the {ship} leave for {port} under {weather}.",
]


def logbook(rng: random.Random, entries: int, fact: str | None = None, depth: float = 0.6) -> str:
    """A harbour logbook of varied entries, with `fact` inserted at `depth` (0 = start, 1 = end)."""
    lines = []
    for day in range(entries):
        template = rng.choice(EVENTS)
        lines.append(
            f"Day {day + 1}. "
            + template.format(
                ship=rng.choice(SHIPS),
                port=rng.choice(PORTS),
                cargo=rng.choice(CARGO),
                weather=rng.choice(WEATHER),
                n=rng.randint(2, 90),
            )
        )
    if fact is not None:
        lines.insert(int(depth * len(lines)), fact)
    return "\n".join(lines)


def calibrate(model, tokenizer, tokens: int, keep_ratio: float, seed: int, output: Path) -> LeanKMasks:
    """Calibrated masks on a logbook other than the question's, saved as a mask repo in `output`."""
    calibration_text = logbook(random.Random(seed + 1), tokens // 26)
    calibration_ids = tokenizer(calibration_text, return_tensors="pt")["input_ids"]
    masks = calibrated_masks(
        model, calibration_ids, keep_ratio=keep_ratio, align=16, base_model="HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    masks = masks.replace(method={**masks.method, "data": f"synthetic harbour logbook, seed {seed + 1}"})
    masks.save_pretrained(output)
    return masks


def build_prompt(tokenizer, tokens: int, seed: int) -> tuple[torch.Tensor, str]:
    rng = random.Random(seed)
    code = str(rng.randint(1000, 9999))
    fact = f"Note from the harbour master: the combination of the harbour master's safe is {code}."
    entries = max(1, tokens // 26)  # an entry is ~26 tokens
    document = logbook(rng, entries, fact)
    question = "What is the combination of the harbour master's safe? Answer with the number only."
    messages = [{"role": "user", "content": f"{document}\n\n{question}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return ids["input_ids"], code


def answer(model, tokenizer, input_ids: torch.Tensor, cache, max_new_tokens: int) -> tuple[str, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), **cache_kwargs(cache),
            max_new_tokens=max_new_tokens, do_sample=False,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2500, help="approximate prompt length")
    parser.add_argument("--masks", default="smollm2-135m-instruct", help="mask repo: dir, shipped name or Hub id")
    parser.add_argument("--calibrate", type=Path, help="calibrate masks instead, save them here and use them")
    parser.add_argument("--keep-ratio", type=float, default=0.3, help="with --calibrate: share of key channels kept")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, tokenizer = load_embedded_model(device="cpu")
    if args.calibrate:
        masks = calibrate(model, tokenizer, args.calibration_tokens, args.keep_ratio, args.seed, args.calibrate)
    else:
        masks = LeanKMasks.from_pretrained(args.masks)
    print(f"masks ({masks.method.get('name', 'unknown')}): {masks.keep_ratio:.1%} of key channels kept, "
          f"{int((masks.kept_counts == 0).sum())} of {masks.kept_counts.numel()} KV heads fully pruned")  # fmt: skip

    input_ids, code = build_prompt(tokenizer, args.tokens, args.seed)
    print(f"prompt: {input_ids.shape[1]} tokens; the buried answer is {code}\n")
    full_text, full_seconds = answer(
        model, tokenizer, input_ids, DynamicCache(config=model.config), args.max_new_tokens
    )
    cache = LeanKCache(masks, model)
    leank_text, leank_seconds = answer(model, tokenizer, input_ids, cache, args.max_new_tokens)
    report = cache.memory_report()

    print("| cache | KV cache MiB | seconds | correct | answer |\n|---|---|---|---|---|")
    for name, text, seconds, mib in (
        ("DynamicCache", full_text, full_seconds, report.dense_bytes / 2**20),
        ("LeanKCache", leank_text, leank_seconds, report.total_bytes / 2**20),
    ):
        print(f"| {name} | {mib:.2f} | {seconds:.1f} | {'yes' if code in text else 'no'} | {text!r} |")
    print(f"\n{report}")


if __name__ == "__main__":
    main()
