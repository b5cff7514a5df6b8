"""The RULER-style suite: seeded tasks of every family of `leank_hf.eval.tasks` in haystacks no training data reads
(*Paradise Lost* and RULER's repeated "noise" passage, alternately), phrased and named by the tasks' ``"test"`` group,
scored per family by string match, and `evaluate_ruler`, which counts for every method the tasks it still solves of
those the full cache solves.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..kv_quantization import DEFAULT_KV_QUANTIZATION, KVQuantization
from .evaluation import FULL_CACHE, EvaluationArguments, MaskSource, leank_cache_factory, method_suffix
from .metrics import solves_task
from .prose import SUITE_TEXTS, TRAINING_TEXTS, text_paragraphs
from .retrieval import RetrievalExample, TaskBuilder
from .tasks import FAMILIES, check_families, word_pool

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RULER_FAMILIES = tuple(FAMILIES)
ALL_FAMILIES = "all"  # the rows that pool every family


@functools.cache
def suite_words() -> tuple[str, ...]:
    """The word-list families' words in the suite: those of *Paradise Lost* that no training text holds."""
    training = [p for name in TRAINING_TEXTS for split in ("train", "heldout") for p in text_paragraphs(name, split)]
    return word_pool(text_paragraphs("paradise_lost"), exclude=word_pool(training))


def make_ruler_suite(
    tokenizer: PreTrainedTokenizerBase,
    tokens: int,
    tasks: int,
    *,
    families: Sequence[str] = RULER_FAMILIES,
    seed: int = 0,
) -> list[RetrievalExample]:
    """`tasks` tasks of each of `families` (family by family) of about `tokens` prompt tokens; task `i` of a family
    hides its needles in `SUITE_TEXTS[i % 2]` and depends only on `(seed, family, tokens, i)`."""
    check_families(families)
    texts = {name: text_paragraphs(name) for name in SUITE_TEXTS}
    builder = TaskBuilder(tokenizer, texts, "test", suite_words())
    suite = []
    for family in families:
        for index in range(tasks):
            rng = random.Random(f"ruler-suite/{seed}/{family}/{tokens}/{index}")
            suite.append(builder.example(rng, family, SUITE_TEXTS[index % len(SUITE_TEXTS)], tokens))
    return suite


def evaluate_ruler(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: dict[str, MaskSource],
    arguments: EvaluationArguments | None = None,
    quantization: KVQuantization = DEFAULT_KV_QUANTIZATION,
) -> list[dict[str, Any]]:
    """Rows `{method, keep_ratio, tokens, family, kept, solved, tasks}`, for each of `arguments.ruler_tokens`: the
    full cache's, then every method's at every `keep_ratios`, each for every family and for all of them pooled
    (family ``"all"``).

    The full cache's rows give `solved` of `tasks` (also as `full_cache_solved`, "k/n"); a method is asked only the
    tasks the full cache solves, and its `kept` is the share of them it solves too (None where the full cache solves
    none). A task is solved when the greedy reply holds every one of its answers, ignoring case. Arguments as for
    `evaluate` (`ruler_tokens`, `ruler_tasks`, `ruler_families`, `keep_ratios` and `seed` are read); with `kv_bits`,
    the methods' rows are named with it (e.g. ``"learned int4"``).
    """
    arguments = arguments or EvaluationArguments()
    families = arguments.ruler_families
    suffix = method_suffix(quantization)
    leank_cache = leank_cache_factory(model, quantization)
    runs = [(ratio, name) for ratio in arguments.keep_ratios for name in methods]
    rows = []
    for tokens in arguments.ruler_tokens:
        suite = make_ruler_suite(tokenizer, tokens, arguments.ruler_tasks, families=families, seed=arguments.seed)
        solved = [
            task
            for task in tqdm(suite, desc=f"RULER-style suite at {tokens} tokens, full cache", leave=False)
            if solves_task(model, tokenizer, task.prompt_ids, task.answers, DynamicCache(config=model.config))
        ]
        rows += [
            {**row, "kept": 1.0 if row["solved"] else None, "full_cache_solved": f"{row['solved']}/{row['tasks']}"}
            for row in _family_rows(FULL_CACHE, 1.0, tokens, families, suite, solved)
        ]
        for ratio, name in tqdm(runs, desc=f"RULER-style suite at {tokens} tokens"):
            source = methods[name]
            # The first solved task (or any, where none is solved) tells whether the method has masks at this ratio.
            first = source(ratio, torch.tensor([(solved or suite)[0].prompt_ids]))
            if first is None:
                continue
            right = []
            for i, task in enumerate(solved):
                masks = first if i == 0 else source(ratio, torch.tensor([task.prompt_ids]))
                if solves_task(model, tokenizer, task.prompt_ids, task.answers, leank_cache(masks)):
                    right.append(task)
            rows += _family_rows(name + suffix, ratio, tokens, families, solved, right)
    return rows


def _family_rows(method: str, ratio: float, tokens: int, families: Sequence[str], asked: list[RetrievalExample],
                 right: list[RetrievalExample]) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for family in (*families, ALL_FAMILIES):
        tasks = sum(family in (ALL_FAMILIES, task.family) for task in asked)
        solved = sum(family in (ALL_FAMILIES, task.family) for task in right)
        rows.append({"method": method, "keep_ratio": ratio, "tokens": tokens, "family": family,
                     "kept": solved / tasks if tasks else None, "solved": solved, "tasks": tasks})  # fmt: skip
    return rows
