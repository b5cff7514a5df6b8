"""Long synthetic retrieval data, built offline: needles hidden in real prose, asked about at the end.

This is the paper's kind of training data for mask learning: the answer can only be produced by attending far back
into the context, so distilling on answer tokens teaches the masks to keep the channels that long-range retrieval
uses. Two mixtures (`make_retrieval_dataset`'s `mixture`):
- ``"ruler"`` (the default): the RULER-style task families of `leank_hf.eval.tasks` (needles of several kinds and
  phrasings, variable chains, word lists), in the training texts of `leank_hf.eval.prose` (*Alice* and *As You Like
  It*), phrased and named by the tasks' ``"train"`` group, or for the held-out split their ``"test"`` group;
- ``"facts"``: the shipped SmolLM2 masks' data, unchanged: 1 to 4 key → value facts in *Alice*, one phrasing.
The RULER-style suite (`leank_hf.eval.ruler`) builds its tasks with the same `TaskBuilder` in texts no mixture reads.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch.utils.data import Dataset

from .prose import TRAINING_TEXTS, Split, prose_paragraphs, text_paragraphs
from .tasks import BODY_FAMILIES, FAMILIES, Group, Task, TaskSetting, word_pool

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# The default training data of `train_masks` and `leank-hf train`: the prompt lengths the shipped SmolLM2 masks were
# learned on (BENCHMARKS.md section 4), and as many examples as the default schedule has stage-1 steps at batch size 1.
TRAINING_LENGTHS = (1024, 8192)
TRAINING_EXAMPLES = 2000
Mixture = Literal["ruler", "facts"]
MIXTURES: tuple[Mixture, ...] = ("ruler", "facts")

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
    """One example before padding: the prompt tokens, the answer, and where the asked needle sits."""

    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    question: str
    depth: float | None  # relative depth of the (first) asked needle; None for word-list tasks
    num_facts: int  # needles hidden in the filler
    family: str = "facts"
    answers: tuple[str, ...] = ()  # every string a right reply holds (`answer` is them joined)
    text: str | None = "alice"  # the filler text; None where the task brings its own haystack

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + self.answer_ids


class PromptRenderer:
    """A user turn (document and question) and the reply, as the tokenizer's chat template writes them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, content: str, answer_prefix: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt, answer) tokens: the prompt is the user turn `content` and the start of the reply, `answer_prefix`
        (if any); the answer is `answer` up to and including the end-of-turn token. Without a chat template: plain
        "content / Answer:" text (the prefix in place of "Answer:")."""
        tokenizer = self.tokenizer
        if tokenizer.chat_template is None:
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            return self.tokens(f"{content}\n{answer_prefix or 'Answer:'}"), self.tokens(f" {answer}") + eos
        messages = [{"role": "user", "content": content}]
        prompt_ids = self._template(messages, add_generation_prompt=True)
        reply = f"{answer_prefix} {answer}" if answer_prefix else answer
        full = self._template([*messages, {"role": "assistant", "content": reply}])
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "the tokenizer's chat template does not extend the generation prompt with the answer; "
                "build the dataset yourself (any dataset with input_ids and answer-only labels works)"
            )
        answer_ids = full[len(prompt_ids) :]
        if answer_prefix:
            # The prefix's tokens as they stand in the reply (tokenized alone they could differ at its end).
            cut = next((k for k in range(1, len(answer_ids) + 1) if tokenizer.decode(answer_ids[:k]) == answer_prefix),
                       None)  # fmt: skip
            if cut is None:
                raise ValueError(f"the tokenizer merges the answer prefix {answer_prefix!r} with the answer")
            prompt_ids, answer_ids = prompt_ids + answer_ids[:cut], answer_ids[cut:]
        # Drop what the template writes after the end-of-turn token (e.g. a newline): the model never predicts it.
        while answer_ids and not tokenizer.decode(answer_ids[-1:]).strip():
            answer_ids.pop()
        return prompt_ids, answer_ids

    def _template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
            )["input_ids"]
        )


class Haystack:
    """One filler text: its paragraphs and their token counts, to draw consecutive paragraphs from and to hide needles
    in at a relative depth in tokens."""

    def __init__(self, prompts: PromptRenderer, name: str, paragraphs: Sequence[str]) -> None:
        self.name, self.paragraphs = name, tuple(paragraphs)
        ids = prompts.tokenizer(list(self.paragraphs), add_special_tokens=False)["input_ids"]
        self.paragraph_tokens = [len(paragraph) for paragraph in ids]

    def draw(self, rng: random.Random, budget: int) -> list[int]:
        """Indices of consecutive paragraphs from a random place in the text (wrapping around) within `budget`
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

    def document(self, chosen: list[int], needles: Sequence[str], depths: Sequence[float]) -> list[str]:
        """The `chosen` paragraphs with each needle inserted at its depth (a share of the filler's tokens, to a
        paragraph); needles at the same place keep the order of their depths."""
        # Paragraph boundaries as a share of the filler's tokens, to place each needle at its depth in tokens.
        boundaries = list(itertools.accumulate(self.paragraph_tokens[i] + 1 for i in chosen))
        document = [self.paragraphs[i] for i in chosen]
        # Insert deepest first so that earlier insertions do not shift the later positions.
        for needle, where in sorted(zip(needles, depths, strict=True), key=lambda item: -item[1]):
            document.insert(bisect.bisect_right(boundaries, where * boundaries[-1]) if chosen else 0, needle)
        return document


class TaskBuilder:
    """Makes `RetrievalExample`s of the task families in a set of filler texts, phrased and named by one `group` of
    `leank_hf.eval.tasks`, with `words` for the word-list families."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, texts: dict[str, Sequence[str]], group: Group,
                 words: Sequence[str]) -> None:  # fmt: skip
        self.prompts = PromptRenderer(tokenizer)
        self.haystacks = {name: Haystack(self.prompts, name, paragraphs) for name, paragraphs in texts.items()}
        self.group, self.words = group, tuple(words)

    def example(self, rng: random.Random, family: str, text: str, tokens: int,
                depths: tuple[float, float] = (0.0, 1.0)) -> RetrievalExample:  # fmt: skip
        """A task of `family` of about `tokens` prompt tokens, hidden in `text` (unless the family brings its own
        haystack), its asked needles at relative depths in `depths`."""
        template_tokens = len(self.prompts.render("", "", "")[0])
        setting = TaskSetting(self.group, self.words, depths, tokens - template_tokens, self._count)
        task = FAMILIES[family](rng, setting)
        if family in BODY_FAMILIES:
            document, text_name = list(task.body), None
        else:
            haystack, text_name = self.haystacks[text], text
            overhead = len(self._render(task, [])[0]) + sum(self._count(s) + 1 for s in task.needles)
            document = haystack.document(haystack.draw(rng, tokens - overhead), task.needles, task.depths)
        prompt_ids, answer_ids = self._render(task, document)
        return RetrievalExample(prompt_ids, answer_ids, task.answer, task.phrasing.question, task.depth,
                                len(task.needles), family, task.answers, text_name)  # fmt: skip

    def _render(self, task: Task, document: list[str]) -> tuple[list[int], list[int]]:
        parts = [task.phrasing.preamble] if task.phrasing.preamble else []
        content = "\n\n".join([*parts, *document, task.phrasing.question])
        return self.prompts.render(content, task.phrasing.answer_prefix, task.answer)

    def _count(self, text: str) -> int:
        return len(self.prompts.tokens(text))


@functools.cache
def training_words(split: Split) -> tuple[str, ...]:
    """The word-list families' words in training data: those of the training texts' training split, or for the
    held-out split those of their held-out split that the training split lacks."""
    train = word_pool([p for name in TRAINING_TEXTS for p in text_paragraphs(name, "train")])
    if split == "train":
        return train
    return word_pool([p for name in TRAINING_TEXTS for p in text_paragraphs(name, "heldout")], exclude=train)


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
        mixture: Mixture = "ruler",
    ) -> None:
        check_lengths(lengths)
        if not 1 <= facts[0] <= facts[1] <= len(_WORDS):
            raise ValueError(
                f"facts must be (fewest, most) facts per example with 1 <= fewest <= most <= {len(_WORDS)}, got {facts}"
            )
        check_depths(depths)
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        if mixture not in MIXTURES:
            raise ValueError(f"mixture must be one of {', '.join(MIXTURES)}, got {mixture!r}")
        self.tokenizer, self.lengths, self.n = tokenizer, lengths, n
        self.facts, self.depths, self.split, self.seed, self.mixture = facts, depths, split, seed, mixture
        self.prompts = PromptRenderer(tokenizer)
        if mixture == "facts":
            self.haystack = Haystack(self.prompts, "alice", prose_paragraphs(split))
        else:
            texts = {name: text_paragraphs(name, split) for name in TRAINING_TEXTS}
            group: Group = "train" if split == "train" else "test"
            self.builder = TaskBuilder(tokenizer, texts, group, training_words(split))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.example(index)
        ids = example.input_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": example.labels}

    def example(self, index: int) -> RetrievalExample:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} examples")
        if self.mixture == "facts":
            return self._fact_example(index)
        rng = random.Random(f"ruler/{self.seed}/{self.split}/{index}")
        tokens = rng.randint(*self.lengths)
        family = rng.choice(list(FAMILIES))
        return self.builder.example(rng, family, rng.choice(TRAINING_TEXTS), tokens, self.depths)

    def _fact_example(self, index: int) -> RetrievalExample:
        """The ``"facts"`` mixture's example `index`, exactly as the shipped masks were trained on."""
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        target_tokens = rng.randint(*self.lengths)
        facts = _draw_facts(rng, rng.randint(*self.facts))
        asked = rng.randrange(len(facts))
        kind, key, value = facts[asked]
        question = f"What is the secret {kind} of the {key}? Answer with the {kind} only."
        statements = [f"(Remember this: the secret {k} of the {name} is {v}.)" for k, name, v in facts]
        depth = rng.uniform(*self.depths)
        depths = [depth if i == asked else rng.random() for i in range(len(facts))]

        def render(document: list[str]) -> tuple[list[int], list[int]]:
            return self.prompts.render("\n\n".join([*document, f"Question: {question}"]), "", value)

        overhead = len(render([])[0]) + sum(len(self.prompts.tokens(s)) + 1 for s in statements)
        filler = self.haystack.draw(rng, target_tokens - overhead)
        prompt_ids, answer_ids = render(self.haystack.document(filler, statements, depths))
        return RetrievalExample(prompt_ids, answer_ids, value, question, depth, len(facts), "facts", (value,))


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
    mixture: Mixture = "ruler",
) -> RetrievalDataset:
    """Long synthetic retrieval examples for mask learning (or, with `split="heldout"`, for evaluation).

    Each example hides needles in consecutive paragraphs of a shipped public-domain text (or is a word list), asks
    about them at the end through the tokenizer's chat template (plain "Question/Answer" text without one), and labels
    only the answer and its end-of-turn token. The `mixture` says which tasks:

    - ``"ruler"``: each example one of the RULER-style task families of `leank_hf.eval.tasks` (drawn uniformly):
      needles (7-digit numbers, UUID-like codes, words) of one, several keys or several values, asked for one or
      several; variable chains; the most common words of a list or coded text. Several phrasings of each, in *Alice*
      or *As You Like It*. The two splits share no filler paragraph, key, value word, needle sentence or question
      (the training split is phrased by the tasks' ``"train"`` group, the held-out one by their ``"test"`` group),
      and neither uses the texts of the RULER-style suite.
    - ``"facts"``: the data the shipped SmolLM2 masks were learned on, unchanged: `facts` key → value facts in *Alice*,
      one asked, all phrased one way.

    Args:
        tokenizer: the model's tokenizer.
        lengths: (shortest, longest) prompt length in tokens; each example draws its length uniformly.
        n: number of examples.
        facts: (fewest, most) facts per example (``"facts"`` mixture only).
        depths: range of relative depth (0 = start, 1 = end of the document) of the asked needles.
        split: ``"train"`` (*Alice* chapters I-IX, *As You Like It* acts I-IV) or ``"heldout"`` (chapters X-XII,
            act V) filler text.
        seed: examples depend only on `(seed, split, index)` (and the mixture).
        mixture: ``"ruler"`` or ``"facts"``, as above.
    """
    return RetrievalDataset(tokenizer, lengths, n, facts=facts, depths=depths, split=split, seed=seed, mixture=mixture)
