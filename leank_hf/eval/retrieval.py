"""Long synthetic retrieval data, built offline: key → value facts hidden in real prose, asked about at the end.

This is the paper's kind of training data for mask learning: the answer can only be produced by attending far back
into the context, so distilling on answer tokens teaches the masks to keep the channels that long-range retrieval
uses. The filler is the shipped public-domain book (`leank_hf.eval.prose`), not a repeated sentence.
"""

from __future__ import annotations

import bisect
import itertools
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from .prose import Split, prose_paragraphs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# The default training data of `train_masks` and `leank-hf train`: the prompt lengths the shipped SmolLM2 masks were
# learned on (BENCHMARKS.md section 4), and as many examples as the default schedule has stage-1 steps at batch size 1.
TRAINING_LENGTHS = (1024, 8192)
TRAINING_EXAMPLES = 2000

_ADJECTIVES = [
    "silver", "crimson", "hidden", "northern", "ancient", "quiet", "golden", "frozen", "hollow", "velvet", "amber",
    "broken", "distant", "painted", "sunken", "copper", "twelfth", "wandering", "ivory", "forgotten",
]  # fmt: skip
_NOUNS = [
    "lantern", "harbour", "orchard", "violin", "observatory", "carriage", "lighthouse", "library", "compass", "garden",
    "bridge", "chapel", "telescope", "mill", "archive", "clocktower", "greenhouse", "ferry", "vault", "workshop",
]  # fmt: skip
_WORDS = [
    "marmalade", "thunder", "pepper", "saffron", "glacier", "pelican", "walnut", "cobalt", "meadow", "falcon",
    "lavender", "quartz", "harvest", "juniper", "tangerine", "basalt", "willow", "sparrow", "cinnamon", "horizon",
]  # fmt: skip


@dataclass(frozen=True)
class RetrievalExample:
    """One example before padding: the prompt tokens, the answer, and where the asked fact sits."""

    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    question: str
    depth: float
    num_facts: int

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + self.answer_ids


class RetrievalDataset(Dataset):
    """`n` retrieval examples, each made on demand from `(seed, split, index)` alone, so it is reproducible.

    Items are dicts of token lists `input_ids`, `attention_mask` and `labels` (answer tokens only, -100 elsewhere),
    ready for `transformers.Trainer` (batch size 1, or any padding collator such as `DataCollatorForSeq2Seq`).
    `example(i)` gives the same example unpadded, with its answer text, for evaluation.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        lengths: tuple[int, int],
        n: int,
        *,
        facts: tuple[int, int],
        depths: tuple[float, float],
        split: Split,
        seed: int,
    ) -> None:
        check_lengths(lengths)
        if not 1 <= facts[0] <= facts[1] <= len(_WORDS):
            raise ValueError(
                f"facts must be (fewest, most) facts per example with 1 <= fewest <= most <= {len(_WORDS)}, got {facts}"
            )
        check_depths(depths)
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        self.tokenizer, self.lengths, self.n = tokenizer, lengths, n
        self.facts, self.depths, self.split, self.seed = facts, depths, split, seed
        self.paragraphs = prose_paragraphs(split)
        self.paragraph_tokens = [
            len(ids) for ids in tokenizer(list(self.paragraphs), add_special_tokens=False)["input_ids"]
        ]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.example(index)
        ids = example.input_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": example.labels}

    def example(self, index: int) -> RetrievalExample:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} examples")
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        target_tokens = rng.randint(*self.lengths)
        facts = _draw_facts(rng, rng.randint(*self.facts))
        asked = rng.randrange(len(facts))
        kind, key, value = facts[asked]
        question = f"What is the secret {kind} of the {key}? Answer with the {kind} only."
        statements = [f"(Remember this: the secret {k} of the {name} is {v}.)" for k, name, v in facts]
        depth = rng.uniform(*self.depths)
        depths = [depth if i == asked else rng.random() for i in range(len(facts))]

        overhead = len(self._prompt_ids([], question)) + sum(len(self._tokens(s)) + 1 for s in statements)
        filler = self._filler(rng, target_tokens - overhead)
        # Paragraph boundaries as a share of the filler's tokens, to place each fact at its depth in tokens.
        boundaries = list(itertools.accumulate(self.paragraph_tokens[i] + 1 for i in filler))
        document = [self.paragraphs[i] for i in filler]
        # Insert deepest first so that earlier insertions do not shift the later positions.
        for statement, where in sorted(zip(statements, depths, strict=True), key=lambda item: -item[1]):
            document.insert(bisect.bisect_right(boundaries, where * boundaries[-1]) if filler else 0, statement)
        prompt_ids = self._prompt_ids(document, question)
        answer_ids = self._answer_ids(document, question, value, prompt_ids)
        return RetrievalExample(prompt_ids, answer_ids, value, question, depth, len(facts))

    def _filler(self, rng: random.Random, budget: int) -> list[int]:
        """Indices of consecutive paragraphs from a random place in the book (wrapping around) within `budget`
        tokens."""
        start = rng.randrange(len(self.paragraphs))
        chosen: list[int] = []
        used = 0
        for step in range(len(self.paragraphs) * 64):
            i = (start + step) % len(self.paragraphs)
            cost = self.paragraph_tokens[i] + 1  # + the paragraph break
            if used + cost > budget:
                break
            chosen.append(i)
            used += cost
        return chosen

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _messages(self, document: list[str], question: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": "\n\n".join([*document, f"Question: {question}"])}]

    def _prompt_ids(self, document: list[str], question: str) -> list[int]:
        if self.tokenizer.chat_template is None:
            return self._tokens("\n\n".join([*document, f"Question: {question}\nAnswer:"]))
        return list(
            self.tokenizer.apply_chat_template(
                self._messages(document, question), add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )

    def _answer_ids(self, document: list[str], question: str, answer: str, prompt_ids: list[int]) -> list[int]:
        """The answer's tokens as the chat template writes them, up to and including its end-of-turn token."""
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        if self.tokenizer.chat_template is None:
            return self._tokens(f" {answer}") + eos
        messages = [*self._messages(document, question), {"role": "assistant", "content": answer}]
        full = list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "the tokenizer's chat template does not extend the generation prompt with the answer; "
                "build the dataset yourself (any dataset with input_ids and answer-only labels works)"
            )
        answer_ids = full[len(prompt_ids) :]
        # Drop what the template writes after the end-of-turn token (e.g. a newline): the model never predicts it.
        while answer_ids and not self.tokenizer.decode(answer_ids[-1:]).strip():
            answer_ids.pop()
        return answer_ids


def _draw_facts(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """`count` facts (kind, key, value) with distinct keys and values: numbers, UUID-like strings or words."""
    keys = rng.sample([f"{a} {n}" for a in _ADJECTIVES for n in _NOUNS], count)
    words = rng.sample(_WORDS, count)
    facts = []
    for key in keys:
        kind = rng.choice(["number", "code", "word"])
        if kind == "number":
            value = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "code":
            hexdigits = string.digits + "abcdef"
            value = "-".join("".join(rng.choices(hexdigits, k=k)) for k in (8, 4, 4))
        else:
            value = words.pop()
        facts.append((kind, key, value))
    return facts


def check_lengths(lengths: Sequence[int]) -> None:
    """Raise a `ValueError` unless `lengths` is (shortest, longest) prompt tokens, MIN MAX with 0 < MIN <= MAX."""
    if len(lengths) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
        raise ValueError(f"lengths must be two token counts, the shortest and longest prompt (MIN MAX), got {lengths}")
    if not 0 < lengths[0] <= lengths[1]:
        raise ValueError(f"lengths MIN MAX needs 0 < MIN <= MAX, got {lengths[0]} {lengths[1]}")


def check_depths(depths: Sequence[float], name: str = "depths") -> None:
    """Raise a `ValueError` unless `depths` is (low, high) relative depths with 0 <= low <= high <= 1."""
    if len(depths) != 2 or not 0.0 <= depths[0] <= depths[1] <= 1.0:
        raise ValueError(f"{name} must be two relative depths LOW HIGH with 0 <= LOW <= HIGH <= 1, got {depths}")


def make_retrieval_dataset(
    tokenizer: PreTrainedTokenizerBase,
    lengths: tuple[int, int] = TRAINING_LENGTHS,
    n: int = TRAINING_EXAMPLES,
    *,
    facts: tuple[int, int] = (1, 4),
    depths: tuple[float, float] = (0.0, 1.0),
    split: Split = "train",
    seed: int = 0,
) -> RetrievalDataset:
    """Long synthetic retrieval examples for mask learning (or, with `split="heldout"`, for evaluation).

    Each example hides `facts` key → value facts (7-digit numbers, UUID-like codes, or words) in consecutive
    paragraphs of the shipped public-domain book, asks about one of them at the end through the tokenizer's chat
    template (plain "Question/Answer" text without one), and labels only the answer and its end-of-turn token.

    Args:
        tokenizer: the model's tokenizer.
        lengths: (shortest, longest) prompt length in tokens; each example draws its length uniformly.
        n: number of examples.
        facts: (fewest, most) facts per example.
        depths: range of relative depth (0 = start, 1 = end of the document) of the asked fact.
        split: ``"train"`` (chapters I-IX) or ``"heldout"`` (chapters X-XII) filler text.
        seed: examples depend only on `(seed, split, index)`.
    """
    return RetrievalDataset(tokenizer, lengths, n, facts=facts, depths=depths, split=split, seed=seed)
