"""Evaluate masks against the full cache: next-token agreement on held-out prose and long-context retrieval.

Every method decodes on top of an exact (dense) prefill, as LeanK does in `generate`:
- next-token KL divergence and top-1 agreement with the full cache over the last `positions` tokens of held-out
  prose (the book's held-out chapters), fed one token at a time;
- retrieval accuracy on held-out retrieval tasks that the full cache solves (so 1.0 = nothing lost), in the format the
  shipped masks were trained on (`make_retrieval_dataset`'s ``"facts"`` mixture in *Alice*'s held-out chapters).
The RULER-style suite, in texts and phrasings no training data uses, is `leank_hf.eval.ruler.evaluate_ruler`.
A method is a function `(keep_ratio, prompt_ids) -> LeanKMasks | None` (None: no masks at that ratio), so static
masks (learned, calibration, random) and per-prompt ones (ThinK) are compared the same way. What is measured is an
`EvaluationArguments`, the home of its defaults (and of `leank-hf eval`'s options).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..architectures import ModelSpec
from ..cache.leank_cache import LeanKCache
from ..checks import check_range
from ..kv_quantization import DEFAULT_KV_QUANTIZATION, KVQuantization
from ..masks import LeanKMasks
from ..methods import calibrated_masks, random_masks, think_masks
from ..windows import DEFAULT_WINDOWS, WindowConfig
from .metrics import answers_correctly, decoded_logits, heldout_windows, next_token_agreement
from .prose import prose_text
from .retrieval import check_depths, make_retrieval_dataset
from .tasks import FAMILIES, check_families

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MaskSource = Callable[[float, torch.Tensor], LeanKMasks | None]
FULL_CACHE = "full cache"
BASELINES = ("calibration", "think", "random")
MIN_RULER_TOKENS = 256


@dataclass
class EvaluationArguments:
    """What `evaluate` measures; `leank-hf eval` makes its options from these fields with `HfArgumentParser`.

    The defaults are those of the shipped SmolLM2 masks' evaluation (BENCHMARKS.md section 4), which also passed
    `retrieval_tasks=40`. The `ruler_*` fields (and `keep_ratios`, `seed`) are what `evaluate_ruler` measures.

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
    seed: int = field(default=0, metadata={"help": "seed of the retrieval and RULER-style tasks"})
    ruler_tokens: list[int] = field(
        default_factory=lambda: [2048, 4096],
        metadata={"help": "prompt lengths of the RULER-style suite (evaluate_ruler), in tokens"},
    )
    ruler_tasks: int = field(default=50, metadata={"help": "RULER-style tasks per family and length"})
    ruler_families: list[str] = field(
        default_factory=lambda: list(FAMILIES),
        metadata={"help": "task families of the RULER-style suite", "choices": list(FAMILIES)},
    )

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
        if not self.ruler_tokens:
            raise ValueError("ruler_tokens must name one or more prompt lengths")
        for tokens in self.ruler_tokens:
            # The longest question, answer prefix and needles take ~250 tokens: shorter prompts would hold no filler.
            check_range(tokens, MIN_RULER_TOKENS, name="ruler_tokens", integer=True)
        check_range(self.ruler_tasks, 0, name="ruler_tasks", low_open=True, integer=True)
        check_families(self.ruler_families, name="ruler_families")


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: dict[str, MaskSource],
    arguments: EvaluationArguments | None = None,
    quantization: KVQuantization = DEFAULT_KV_QUANTIZATION,
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
        quantization: how every LeanK cache stores its middle tokens; with `kv_bits`, the methods' rows are named
            with it (e.g. ``"learned int4"``).
    """
    arguments = arguments or EvaluationArguments()
    positions = arguments.positions
    windows = heldout_windows(tokenizer, arguments.text_tokens, arguments.texts)
    references = [decoded_logits(model, w, DynamicCache(config=model.config), positions) for w in windows]
    lengths = (arguments.retrieval_tokens, arguments.retrieval_tokens)
    tasks = make_retrieval_dataset(
        tokenizer, lengths, arguments.retrieval_tasks, facts=(1, 3), depths=tuple(arguments.retrieval_depths),
        split="heldout", seed=arguments.seed, mixture="facts",
    )  # fmt: skip
    examples = [tasks.example(i) for i in range(len(tasks))]
    solved = [
        e
        for e in tqdm(examples, desc="retrieval, full cache", leave=False)
        if answers_correctly(model, tokenizer, e.prompt_ids, e.answer, DynamicCache(config=model.config))
    ]
    rows = [{"method": FULL_CACHE, "keep_ratio": 1.0, "kl": 0.0, "top1": 1.0, "retrieval": 1.0,
             "full_cache_solved": f"{len(solved)}/{len(examples)}"}]  # fmt: skip
    suffix = method_suffix(quantization)
    leank_cache = leank_cache_factory(model, quantization)
    runs = [(ratio, name) for ratio in arguments.keep_ratios for name in methods]
    for ratio, name in tqdm(runs, desc="LeanK evaluation"):
        source = methods[name]
        scores = []
        for window, reference in zip(windows, references, strict=True):
            masks = source(ratio, window[:, : window.shape[1] - positions])
            if masks is None:
                break
            scores.append(next_token_agreement(reference, decoded_logits(model, window, leank_cache(masks), positions)))
        if not scores:
            continue
        correct = 0
        for example in solved:
            masks = source(ratio, torch.tensor([example.prompt_ids]))
            correct += answers_correctly(model, tokenizer, example.prompt_ids, example.answer, leank_cache(masks))
        kl, top1 = (sum(values) / len(values) for values in zip(*scores, strict=True))
        rows.append({"method": name + suffix, "keep_ratio": ratio, "kl": kl, "top1": top1,
                     "retrieval": correct / len(solved) if solved else None})  # fmt: skip
    return rows


def method_suffix(quantization: KVQuantization) -> str:
    """What a method's row name gets for `quantization`: ``" int4"`` for 4-bit middles, nothing unquantized."""
    return "" if quantization.kv_bits is None else f" int{quantization.kv_bits}"


def leank_cache_factory(model: PreTrainedModel, quantization: KVQuantization) -> Callable[[LeanKMasks], LeanKCache]:
    """A fresh `LeanKCache` for `model` with given masks, storing its middle tokens as `quantization` says."""
    return lambda masks: LeanKCache(masks, model, kv_bits=quantization.kv_bits, q_group_size=quantization.q_group_size)


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
            return calibrated_masks(model, ids, keep_ratio=ratio, **window_fields)

        methods["calibration"] = lambda ratio, prompt: calibrated(ratio)
    if "think" in baselines:
        methods["think"] = lambda ratio, prompt: think_masks(model, prompt, ratio, **window_fields)
    if "random" in baselines:
        methods["random"] = lambda ratio, prompt: random_masks(spec, ratio, **window_fields)
    return methods
