"""Evaluate masks against the full cache: next-token agreement on held-out prose and long-context retrieval.

Every method decodes on top of an exact (dense) prefill, as LeanK does in `generate`:
- next-token KL divergence and top-1 agreement with the full cache over the last `positions` tokens of held-out
  prose (the book's held-out chapters), fed one token at a time;
- retrieval accuracy on held-out retrieval tasks that the full cache solves (so 1.0 = nothing lost).
A method is a function `(keep_ratio, prompt_ids) -> LeanKMasks | None` (None: no masks at that ratio), so static
masks (learned, calibration, random) and per-prompt ones (ThinK) are compared the same way. What is measured is an
`EvaluationArguments`, the home of its defaults (and of `leank-hf eval`'s options).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .architectures import ModelSpec
from .baselines import random_masks, think_masks
from .cache import LeanKCache
from .checks import check_range
from .compat import cache_kwargs
from .data import prose_text
from .masks import LeanKMasks
from .training.data import check_depths, make_retrieval_dataset
from .windows import DEFAULT_WINDOWS, WindowConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MaskSource = Callable[[float, torch.Tensor], LeanKMasks | None]
FULL_CACHE = "full cache"
BASELINES = ("calibration", "think", "random")


@dataclass
class EvaluationArguments:
    """What `evaluate` measures; `leank-hf eval` makes its options from these fields with `HfArgumentParser`.

    The defaults are those of the shipped SmolLM2 masks' evaluation (BENCHMARKS.md section 4), which also passed
    `retrieval_tasks=40`.

    Raises:
        ValueError: naming the field, for a value out of range (checked before any model is loaded).
    """

    keep_ratios: list[float] = field(
        default_factory=lambda: [0.5, 0.3, 0.2],
        metadata={"help": "keep ratios the baselines are evaluated at (learned masks: at their own)"},
    )
    text_tokens: int = field(default=4096, metadata={"help": "length of each held-out prose window"})
    positions: int = field(default=512, metadata={"help": "last positions of each window compared"})
    texts: int = field(default=2, metadata={"help": "held-out prose windows"})
    retrieval_tokens: int = field(default=2048, metadata={"help": "length of each held-out retrieval task, in tokens"})
    retrieval_tasks: int = field(default=20, metadata={"help": "held-out retrieval tasks"})
    retrieval_depths: list[float] = field(
        default_factory=lambda: [0.5, 0.85],
        metadata={"help": "relative depth of the asked fact in each retrieval task", "metavar": ("LOW", "HIGH")},
    )
    seed: int = field(default=0, metadata={"help": "seed of the retrieval tasks"})

    def __post_init__(self) -> None:
        for ratio in self.keep_ratios:
            check_range(ratio, 0, 1, name="keep_ratios", low_open=True)
        for name in ("text_tokens", "positions", "texts", "retrieval_tokens", "retrieval_tasks"):
            check_range(getattr(self, name), 0, name=name, low_open=True, integer=True)
        if self.positions >= self.text_tokens:
            raise ValueError(
                f"positions ({self.positions}) must be below text_tokens ({self.text_tokens}): the tokens before them "
                "are the prefill; lower positions or raise text_tokens"
            )
        check_depths(self.retrieval_depths, name="retrieval_depths")
        check_range(self.seed, 0, name="seed", integer=True)


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
    arguments: EvaluationArguments | None = None,
) -> list[dict[str, Any]]:
    """Rows `{method, keep_ratio, kl, top1, retrieval, ...}`: the full cache first, then every method at every ratio.
    `retrieval` is None when the full cache solves none of the tasks.

    Args:
        model, tokenizer: the model under test and its tokenizer.
        methods: name -> `MaskSource`.
        arguments: what is measured (default: `EvaluationArguments()`): each method at every `keep_ratios`, on
            `texts` held-out prose windows of `text_tokens` tokens, whose last `positions` are decoded and compared
            with the full cache, and on `retrieval_tasks` held-out retrieval tasks of `retrieval_tokens` tokens with
            the asked fact at `retrieval_depths`, of which only those the full cache answers count.
    """
    arguments = arguments or EvaluationArguments()
    positions = arguments.positions
    windows = heldout_windows(tokenizer, arguments.text_tokens, arguments.texts)
    references = [decoded_logits(model, w, DynamicCache(config=model.config), positions) for w in windows]
    lengths = (arguments.retrieval_tokens, arguments.retrieval_tokens)
    tasks = make_retrieval_dataset(
        tokenizer, lengths, arguments.retrieval_tasks, facts=(1, 3), depths=tuple(arguments.retrieval_depths),
        split="heldout", seed=arguments.seed,
    )  # fmt: skip
    examples = [tasks.example(i) for i in range(len(tasks))]
    solved = [
        e
        for e in tqdm(examples, desc="retrieval, full cache", leave=False)
        if answers_correctly(model, tokenizer, e.prompt_ids, e.answer, DynamicCache(config=model.config))
    ]
    rows = [{"method": FULL_CACHE, "keep_ratio": 1.0, "kl": 0.0, "top1": 1.0, "retrieval": 1.0,
             "full_cache_solved": f"{len(solved)}/{len(examples)}"}]  # fmt: skip
    runs = [(ratio, name) for ratio in arguments.keep_ratios for name in methods]
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
    baselines: Sequence[str] = BASELINES,
    *,
    windows: WindowConfig = DEFAULT_WINDOWS,
    calibration_tokens: int = 4096,
) -> dict[str, MaskSource]:
    """The comparison of the paper: `learned` masks (each used at its own keep ratio) and the baselines
    ``"calibration"`` (mean |q|·|k| on `calibration_tokens` of the training prose), ``"think"`` (per prompt) and
    ``"random"``, built with the given `windows`."""
    spec = ModelSpec.from_model(model)
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    window_fields = dataclasses.asdict(windows)
    methods: dict[str, MaskSource] = {}
    if learned:
        by_ratio = {round(m.keep_ratio, 2): m for m in learned}
        methods["learned"] = lambda ratio, prompt: by_ratio.get(round(ratio, 2))
    if "calibration" in baselines:
        ids = tokenizer(prose_text("train"), add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids[:, :calibration_tokens]

        @functools.cache
        def calibrated(ratio: float) -> LeanKMasks:
            return LeanKMasks.from_calibration(model, ids, keep_ratio=ratio, **window_fields)

        methods["calibration"] = lambda ratio, prompt: calibrated(ratio)
    if "think" in baselines:
        methods["think"] = lambda ratio, prompt: think_masks(model, prompt, ratio, **window_fields)
    if "random" in baselines:
        methods["random"] = lambda ratio, prompt: random_masks(spec, ratio, **window_fields)
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
