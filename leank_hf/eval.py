"""Evaluate masks against the full cache: next-token agreement on held-out prose and long-context retrieval.

Every method decodes on top of an exact (dense) prefill, as LeanK does in `generate`:
- next-token KL divergence and top-1 agreement with the full cache over the last `positions` tokens of held-out
  prose (the book's held-out chapters), fed one token at a time;
- retrieval accuracy on held-out retrieval tasks that the full cache solves (so 1.0 = nothing lost).
A method is a function `(keep_ratio, prompt_ids) -> LeanKMasks | None` (None: no masks at that ratio), so static
masks (learned, calibration, random) and per-prompt ones (ThinK) are compared the same way.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .architectures import ModelSpec
from .baselines import random_masks, think_masks
from .cache import LeanKCache
from .compat import cache_kwargs
from .data import prose_text
from .masks import LeanKMasks
from .training.data import make_retrieval_dataset

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MaskSource = Callable[[float, torch.Tensor], LeanKMasks | None]
FULL_CACHE = "full cache"


def heldout_windows(tokenizer: PreTrainedTokenizerBase, tokens: int, count: int) -> list[torch.Tensor]:
    """`count` windows `[1, tokens]` of the held-out chapters, spread evenly over them (overlapping if needed)."""
    ids = tokenizer(prose_text("heldout"), add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] < tokens:
        raise ValueError(f"the held-out text has {ids.shape[1]} tokens, fewer than the {tokens} asked for")
    last = ids.shape[1] - tokens
    starts = [round(i * last / max(1, count - 1)) for i in range(count)]
    return [ids[:, s : s + tokens] for s in starts]


def decoded_logits(model: PreTrainedModel, input_ids: torch.Tensor, cache, positions: int) -> torch.Tensor:
    """`[positions, vocab]` fp32 logits at the last `positions` tokens of `input_ids` `[1, T]`: the tokens before
    them are prefilled exactly, then each of them is fed one at a time on `cache`."""
    device = model.device
    input_ids = input_ids.to(device)
    split = input_ids.shape[1] - positions
    with torch.no_grad():
        model(input_ids=input_ids[:, :split], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        steps = [
            model(input_ids=input_ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits[0, -1].float()
            for t in range(split, input_ids.shape[1])
        ]
    return torch.stack(steps)


def next_token_agreement(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference ‖ logits), share of positions with the same top-1 token) over `[positions, vocab]`."""
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    top1 = (reference.argmax(-1) == logits.argmax(-1)).float().mean()
    return float(kl), float(top1)


def answers_correctly(model: PreTrainedModel, tokenizer, prompt_ids: list[int], answer: str, cache) -> bool:
    """Greedy-decode the answer with `cache` and check that it contains `answer` (small models often restate the
    question first, hence the room beyond the answer's length)."""
    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    answer_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), do_sample=False,
                             max_new_tokens=answer_tokens + 24, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    return answer in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: dict[str, MaskSource],
    keep_ratios: Sequence[float] = (0.5, 0.3, 0.2),
    *,
    text_tokens: int = 4096,
    positions: int = 512,
    texts: int = 2,
    retrieval_tokens: int = 2048,
    retrieval_tasks: int = 20,
    retrieval_depths: tuple[float, float] = (0.5, 0.85),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows `{method, keep_ratio, kl, top1, retrieval, ...}`: the full cache first, then every method at every ratio.
    `retrieval` is None when the full cache solves none of the tasks.

    Args:
        model, tokenizer: the model under test and its tokenizer.
        methods: name -> `MaskSource`.
        keep_ratios: ratios to evaluate each method at.
        text_tokens, positions, texts: `texts` held-out prose windows of `text_tokens` tokens; the last `positions`
            of each are decoded and compared with the full cache.
        retrieval_tokens, retrieval_tasks, retrieval_depths: held-out retrieval tasks of that length, with the asked
            fact at that relative depth; only those the full cache answers count.
        seed: seed of the retrieval tasks.
    """
    windows = heldout_windows(tokenizer, text_tokens, texts)
    references = [decoded_logits(model, w, DynamicCache(config=model.config), positions) for w in windows]
    tasks = make_retrieval_dataset(tokenizer, (retrieval_tokens, retrieval_tokens), retrieval_tasks, facts=(1, 3),
                                   depths=retrieval_depths, split="heldout", seed=seed)  # fmt: skip
    examples = [tasks.example(i) for i in range(len(tasks))]
    solved = [
        e
        for e in tqdm(examples, desc="retrieval, full cache", leave=False)
        if answers_correctly(model, tokenizer, e.prompt_ids, e.answer, DynamicCache(config=model.config))
    ]
    rows = [{"method": FULL_CACHE, "keep_ratio": 1.0, "kl": 0.0, "top1": 1.0, "retrieval": 1.0,
             "full_cache_solved": f"{len(solved)}/{len(examples)}"}]  # fmt: skip
    runs = [(ratio, name) for ratio in keep_ratios for name in methods]
    for ratio, name in tqdm(runs, desc="LeanK evaluation"):
        source = methods[name]
        scores = []
        for window, reference in zip(windows, references, strict=True):
            masks = source(ratio, window[:, : window.shape[1] - positions])
            if masks is None:
                break
            scores.append(
                next_token_agreement(reference, decoded_logits(model, window, LeanKCache(masks, model), positions))
            )
        if not scores:
            continue
        correct = 0
        for example in solved:
            masks = source(ratio, torch.tensor([example.prompt_ids]))
            correct += answers_correctly(model, tokenizer, example.prompt_ids, example.answer, LeanKCache(masks, model))
        kl, top1 = (sum(values) / len(values) for values in zip(*scores, strict=True))
        rows.append({"method": name, "keep_ratio": ratio, "kl": kl, "top1": top1,
                     "retrieval": correct / len(solved) if solved else None})  # fmt: skip
    return rows


def standard_methods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    learned: Sequence[LeanKMasks] = (),
    baselines: Sequence[str] = ("calibration", "think", "random"),
    *,
    sink: int = 64,
    recent: int = 256,
    calibration_tokens: int = 4096,
) -> dict[str, MaskSource]:
    """The comparison of the paper: `learned` masks (each used at its own keep ratio) and the baselines
    ``"calibration"`` (mean |q|·|k| on `calibration_tokens` of the training prose), ``"think"`` (per prompt) and
    ``"random"``, built with the given `sink` and `recent`."""
    spec = ModelSpec.from_model(model)
    unknown = set(baselines) - {"calibration", "think", "random"}
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from calibration, think, random")
    methods: dict[str, MaskSource] = {}
    if learned:
        by_ratio = {round(m.keep_ratio, 2): m for m in learned}
        methods["learned"] = lambda ratio, prompt: by_ratio.get(round(ratio, 2))
    if "calibration" in baselines:
        ids = tokenizer(prose_text("train"), add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids[:, :calibration_tokens]

        @functools.cache
        def calibrated(ratio: float) -> LeanKMasks:
            return LeanKMasks.from_calibration(model, ids, keep_ratio=ratio, sink=sink, recent=recent)

        methods["calibration"] = lambda ratio, prompt: calibrated(ratio)
    if "think" in baselines:
        methods["think"] = lambda ratio, prompt: think_masks(model, prompt, ratio, sink=sink, recent=recent)
    if "random" in baselines:
        methods["random"] = lambda ratio, prompt: random_masks(spec, ratio, sink=sink, recent=recent)
    return methods


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `evaluate` rows."""
    lines = ["| method | keep ratio | KL | top-1 agreement | retrieval (of full cache's) |", "|---|---|---|---|---|"]
    for row in rows:
        retrieval = "n/a" if row["retrieval"] is None else f"{row['retrieval']:.2f}"
        retrieval += f" ({row['full_cache_solved']} solved)" if "full_cache_solved" in row else ""
        lines.append(
            f"| {row['method']} | {row['keep_ratio']:.2f} | {row['kl']:.4f} | {row['top1']:.3f} | {retrieval} |"
        )
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write `accuracy_png` to `path` (atomically)."""
    from .io import atomic_write_bytes

    atomic_write_bytes(path, accuracy_png(rows))


def accuracy_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """PNG bytes: top-1 agreement, KL and retrieval against keep ratio, one line per method (on a `Figure` of its
    own: the user's matplotlib backend and pyplot state stay as they are)."""
    from matplotlib.figure import Figure

    from .card import figure_png

    metrics = [
        ("top1", "top-1 agreement with full cache"),
        ("kl", "KL(full ‖ method)"),
        ("retrieval", "retrieval kept"),
    ]
    figure = Figure(figsize=(5 * len(metrics), 4), layout="constrained")
    axes = figure.subplots(1, len(metrics))
    methods = [m for m in dict.fromkeys(row["method"] for row in rows) if m != FULL_CACHE]
    for axis, (key, title) in zip(axes, metrics, strict=True):
        for method in methods:
            points = sorted(
                (row["keep_ratio"], row[key]) for row in rows if row["method"] == method and row[key] is not None
            )
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=method)
        if key != "kl":
            axis.axhline(1.0, color="grey", linestyle="--", linewidth=1, label=FULL_CACHE)
        else:
            axis.set_yscale("log")
        axis.set(xlabel="key channels kept", title=title)
        axis.grid(alpha=0.3)
    axes[0].legend()
    return figure_png(figure, dpi=120)
