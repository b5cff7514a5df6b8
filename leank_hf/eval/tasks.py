"""RULER-style task families as text: what each task hides in its haystack, what it asks, and what a right reply holds.

A family is a function `(rng, setting) -> Task`; `FAMILIES` names them as RULER and kvpress do:
- ``niah_single``: one needle (a key → value statement) in the filler, asked for its value;
- ``niah_multikey``: four needles of different keys, asked for one key's value;
- ``niah_multivalue``: four values of one key, asked for all of them;
- ``niah_multiquery``: four needles of different keys, asked for two keys' values;
- ``variable_tracking``: a chain of variable assignments (X = 12345, Y = X, ...) among a distractor chain, asked
  for every variable that ends up holding the chain's value;
- ``common_words``: a numbered list of words (no filler), asked for its three most common words;
- ``frequent_words``: a "coded text" of random words with Zipf frequencies (no filler), asked for its three most
  frequent ones.
Needle values are 7-digit numbers, UUID-like codes (8-4-4-4-12 hex digits) or words; keys are adjective-noun pairs.

Everything that is phrased or named comes in two disjoint groups: ``"train"`` (training data) and ``"test"``
(held-out data and the RULER-style suite, whose first phrasing of each family is RULER's own). Keys, value words,
needle sentences and questions of one group never occur in the other, and the test group's keys and value words are
none of those of the shipped masks' training data (`make_retrieval_dataset(mixture="facts")`) either, so a test task
is phrased and named in a way no training task was (`tests/test_ruler.py` checks it).
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Group = Literal["train", "test"]

_ADJECTIVES: dict[Group, tuple[str, ...]] = {
    "train": ("amber", "brisk", "copper", "dusty", "eager", "faded", "gentle", "hollow", "icy", "jolly", "kindly",
              "lofty", "mellow", "nimble", "olive", "plain", "rustic", "sleepy", "tidy", "vivid"),
    "test": ("bitter", "cheerful", "dizzy", "electric", "fearless", "gloomy", "humble", "jagged", "lucky", "marble",
             "noble", "obscure", "proud", "purple", "rapid", "restless", "scarlet", "twisted", "wicked", "zealous"),
}  # fmt: skip
_NOUNS: dict[Group, tuple[str, ...]] = {
    "train": ("anchor", "barrel", "candle", "dragon", "engine", "feather", "glove", "hammer", "island", "kettle",
              "ladder", "meadow", "needle", "oyster", "pillow", "rocket", "saddle", "tunnel", "umbrella", "wagon"),
    "test": ("bakery", "canyon", "cathedral", "citadel", "dungeon", "fortress", "kitchen", "mirror", "monastery",
             "palace", "pavilion", "quarry", "river", "stable", "statue", "theatre", "tower", "valley", "whistle",
             "zeppelin"),
}  # fmt: skip
_VALUE_WORDS: dict[Group, tuple[str, ...]] = {
    "train": ("apricot", "biscuit", "cactus", "dolphin", "emerald", "fountain", "giraffe", "hazelnut", "igloo",
              "jasmine", "koala", "lemonade", "mango", "nutmeg", "origami", "peacock", "raspberry", "sapphire",
              "tortoise", "volcano"),
    "test": ("avalanche", "blizzard", "caramel", "daffodil", "eclipse", "flamingo", "gondola", "harpoon", "iceberg",
             "jellyfish", "kingfisher", "mandolin", "nightingale", "obsidian", "porcupine", "pretzel", "raccoon",
             "trombone", "turquoise", "walrus"),
}  # fmt: skip

_KIND_NOUNS = {"number": ("number", "numbers"), "uuid": ("UUID", "UUIDs"), "word": ("word", "words")}

# Needle sentences: "{value}" for "{key}", of a kind named "{kind}" (plural "{kinds}").
_NEEDLES: dict[Group, tuple[str, ...]] = {
    "train": (
        "(Remember this: a special magic {kind} for {key} is {value}.)",
        "Note that {key} has the special magic {kind} {value}.",
        "Among the special magic {kinds} for {key} is {value}.",
    ),
    "test": (
        "One of the special magic {kinds} for {key} is: {value}.",  # RULER's
        "Remember that {value} is one of the special magic {kinds} for {key}.",
        "The text hides a special magic {kind} for {key}: {value}.",
    ),
}


@dataclass(frozen=True)
class Phrasing:
    """How a task is asked: an instruction before the document (may be empty), the question after it, and the start
    of the reply (may be empty), as `str.format` templates."""

    preamble: str
    question: str
    answer_prefix: str


# What is asked is "{asked}" ("the special magic number for quiet-river", "the 2 special magic UUIDs for ..."),
# "{Asked}" capitalised, "{be}" its verb ("is" / "are"), "{them}" what the reply gives ("the number", "the numbers").
_NIAH_PHRASINGS: dict[Group, tuple[Phrasing, ...]] = {
    "train": (
        Phrasing("", "Tell me {asked} given in the text above.", "{Asked} {be}"),
        Phrasing("The following text contains special magic {kinds} that you must remember.",
                 "Recall {asked} from the text. Give {them} only.", ""),
        Phrasing("", "What {be} {asked}? Reply briefly.", ""),
    ),
    "test": (
        # RULER's, without its answer prefix ("{Asked} mentioned in the provided text {be}"), after which SmolLM2
        # wrote anything but the answer.
        Phrasing("Some special magic {kinds} are hidden within the following text. Make sure to memorize it. I will "
                 "quiz you about the {kinds} afterwards.", "What {be} {asked} mentioned in the provided text?", ""),
        Phrasing("Special magic {kinds} are hidden in the text below; read it carefully.",
                 "According to the text above, what {be} {asked}? Answer with {them} only.", ""),
        Phrasing("", "Question: what {be} {asked}? Answer with {them} only.", "Answer:"),
    ),
}  # fmt: skip
# Assignments: a value, then copies ("{name}" takes "{value}", or the value of "{source}").
_ASSIGNMENTS: dict[Group, tuple[tuple[str, str], ...]] = {
    "train": (("Let {name} be {value}.", "Let {name} be equal to {source}."),
              ("{name} := {value};", "{name} := {source};")),
    "test": (("VAR {name} = {value}.", "VAR {name} = VAR {source}."),  # RULER's
             ("Set {name} to {value}.", "Set {name} to the value of {source}.")),
}  # fmt: skip
_VT_PHRASINGS: dict[Group, tuple[Phrasing, ...]] = {
    "train": (
        Phrasing("Keep track of the variable assignments in the following text.",
                 "List every variable whose value is {value}.", "Variables equal to {value}:"),
        Phrasing("", "Name all the variables that are equal to {value} in the text above.", ""),
    ),
    "test": (
        Phrasing("Memorize and track the chain(s) of variable assignment hidden in the following text.",
                 "Question: Find all variables that are assigned the value {value} in the text above.",
                 "Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
                 "assigned the value {value}, they are:"),  # RULER's
        Phrasing("Variables are assigned values in the text below.",
                 "Which variables end up holding the value {value}? List all of them.", ""),
    ),
}  # fmt: skip
# Word lists: "{words}" is "word" or "3 words" ("{coded}": "coded word(s)"), "{be}", "{appear}" and "{occur}" agree.
_CWE_PHRASINGS: dict[Group, tuple[Phrasing, ...]] = {
    "train": (
        Phrasing("Count how often each word occurs in the list below.",
                 "Name the {words} that {occur} most often in the list.", "Most frequent:"),
        Phrasing("", "Which {words} {be} repeated the most in this list?", ""),
    ),
    "test": (
        Phrasing("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                 "the ones that appear most often.", "Question: What {be} the {words} that {appear} most often in the "
                 "above list?", "Answer: The {words} that {appear} most often in the list {be}:"),  # RULER's
        Phrasing("Here is a numbered list of words; a few of them repeat many times.",
                 "Which {words} {appear} most often in the list above?", ""),
    ),
}  # fmt: skip
_FWE_PHRASINGS: dict[Group, tuple[Phrasing, ...]] = {
    "train": (
        Phrasing("Count the coded words in the text below, ignoring the dots '....'.",
                 "Name the {coded} that {occur} most often.", "Most frequent:"),
        Phrasing("", "What {be} the most common {coded} above?", ""),
    ),
    "test": (
        Phrasing("Read the following coded text and track the frequency of each coded word. Find the most "
                 "frequently appeared {coded}.", "Question: Do not provide any explanation. Please ignore the dots "
                 "'....'. What {be} the most frequently appeared {coded} in the above coded text?",
                 "Answer: According to the coded text above, the most frequently appeared {coded} {be}:"),  # RULER's
        Phrasing("The coded text below repeats some coded words far more often than others.",
                 "Which {coded} {occur} most often in the coded text above? Ignore the dots '....'.", ""),
    ),
}  # fmt: skip

# Sizes: RULER's (4 needles of which 4 asked, 4 hops, 10 common words, 3 frequent words) are beyond
# SmolLM2-135M-Instruct, which solved almost none of those tasks with the full cache; these are what it solves often
# enough at 2K tokens to compare caches on (BENCHMARKS.md).
NIAH_NEEDLES = 4  # needles of the multi-key and multi-query tasks (one or NIAH_QUERIES asked, the rest distractors)
NIAH_VALUES = 2  # values of the one key of a multi-value task, all asked
NIAH_QUERIES = 2  # keys asked by a multi-query task
VT_HOPS = 1  # copies after the first assignment of a chain: VT_HOPS + 1 variables hold the value
VT_CHAINS = 2  # the asked chain and a distractor
CWE_COMMON = 1  # common words asked for
CWE_RATIO = 10  # a common word occurs this many times as often as an uncommon one (RULER: 30 to 3)
FWE_ANSWERS = 1  # most frequent coded words asked for


@dataclass(frozen=True)
class Task:
    """One task as text. `needles` go into the filler at `depths` (relative, 0 = start of the document, 1 = end); a
    family that brings its own haystack (word lists) gives it as `body` and no needles. A reply is right when it holds
    every one of `answers` (`leank_hf.eval.metrics.string_match_all`)."""

    family: str
    phrasing: Phrasing  # already filled in
    needles: tuple[str, ...]
    depths: tuple[float, ...]
    answers: tuple[str, ...]
    depth: float | None = None  # of the first asked needle
    body: tuple[str, ...] = ()

    @property
    def answer(self) -> str:
        """The reply a training example teaches: the answers, comma-separated."""
        return ", ".join(self.answers)


@dataclass(frozen=True)
class TaskSetting:
    """What a family draws from: the `group`'s names and phrasings, `words` for word lists, the range of `depths` of
    the asked needles, and `budget` tokens (as `count_tokens` counts them) for a family's own haystack."""

    group: Group
    words: tuple[str, ...]
    depths: tuple[float, float]
    budget: int
    count_tokens: Callable[[str], int]


def word_pool(paragraphs: Sequence[str], exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """Distinct lower-case words of at least four letters in `paragraphs`, minus `exclude`'s, sorted."""
    words = {w for p in paragraphs for w in re.findall(r"[A-Za-z']+", p) if len(w) >= 4 and w.isalpha() and w.islower()}
    return tuple(sorted(words - set(exclude)))


def _value(rng: random.Random, kind: str, group: Group, taken: set[str]) -> str:
    while True:
        if kind == "number":
            value = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "uuid":
            value = "-".join("".join(rng.choices(string.digits + "abcdef", k=k)) for k in (8, 4, 4, 4, 12))
        else:
            value = rng.choice(_VALUE_WORDS[group])
        if value not in taken:
            taken.add(value)
            return value


def _keys(rng: random.Random, group: Group, count: int) -> list[str]:
    """`count` adjective-noun keys sharing neither part (RULER's keys are unrelated words)."""
    adjectives, nouns = rng.sample(_ADJECTIVES[group], count), rng.sample(_NOUNS[group], count)
    return [f"{a}-{n}" for a, n in zip(adjectives, nouns, strict=True)]


def _depths(rng: random.Random, setting: TaskSetting, asked: int, others: int) -> tuple[list[float], list[float]]:
    return [rng.uniform(*setting.depths) for _ in range(asked)], [rng.random() for _ in range(others)]


def _niah(rng: random.Random, setting: TaskSetting, family: str, needles: int, keys: int, asked: int) -> Task:
    """`needles` needles over `keys` keys (each key's share of values), asking for the values of `asked` keys."""
    group = setting.group
    kind = rng.choice(list(_KIND_NOUNS))
    kind_noun, kinds = _KIND_NOUNS[kind]
    names = _keys(rng, group, keys)
    taken: set[str] = set()
    statements = [(names[i % keys], _value(rng, kind, group, taken)) for i in range(needles)]
    template = rng.choice(_NEEDLES[group])
    asked_keys = names[:asked]
    asked_depths, other_depths = _depths(rng, setting, sum(k in asked_keys for k, _ in statements), needles)
    depths = [asked_depths.pop() if key in asked_keys else other_depths.pop() for key, _ in statements]
    order = sorted(range(needles), key=depths.__getitem__)  # answers in the order the document gives them
    answers = tuple(statements[i][1] for i in order if statements[i][0] in asked_keys)
    plural = len(answers) > 1
    described = " and ".join([", ".join(asked_keys[:-1]), asked_keys[-1]] if asked > 1 else asked_keys)
    count = f"{len(answers)} " if plural and asked == 1 else ""
    asked_text = f"the {count}special magic {kinds if plural else kind_noun} for {described}"
    phrasing = _fill(rng.choice(_NIAH_PHRASINGS[group]), asked=asked_text, Asked=asked_text[0].upper() + asked_text[1:],
                     be="are" if plural else "is", kinds=kinds,
                     them=f"the {kinds if plural else kind_noun}")  # fmt: skip
    sentences = tuple(template.format(kind=kind_noun, kinds=kinds, key=k, value=v) for k, v in statements)
    first = min(d for (key, _), d in zip(statements, depths, strict=True) if key in asked_keys)
    return Task(family, phrasing, sentences, tuple(depths), answers, depth=first)


def niah_single(rng: random.Random, setting: TaskSetting) -> Task:
    return _niah(rng, setting, "niah_single", needles=1, keys=1, asked=1)


def niah_multikey(rng: random.Random, setting: TaskSetting) -> Task:
    return _niah(rng, setting, "niah_multikey", needles=NIAH_NEEDLES, keys=NIAH_NEEDLES, asked=1)


def niah_multivalue(rng: random.Random, setting: TaskSetting) -> Task:
    return _niah(rng, setting, "niah_multivalue", needles=NIAH_VALUES, keys=1, asked=1)


def niah_multiquery(rng: random.Random, setting: TaskSetting) -> Task:
    return _niah(rng, setting, "niah_multiquery", needles=NIAH_NEEDLES, keys=NIAH_NEEDLES, asked=NIAH_QUERIES)


def variable_tracking(rng: random.Random, setting: TaskSetting) -> Task:
    """`VT_CHAINS` chains of `VT_HOPS` copies each, interleaved but each in order; the first chain is asked."""
    first, copy = rng.choice(_ASSIGNMENTS[setting.group])
    names = iter(_distinct(rng, VT_CHAINS * (VT_HOPS + 1), lambda: "".join(rng.choices(string.ascii_uppercase, k=5))))
    values = _distinct(rng, VT_CHAINS, lambda: str(rng.randint(10_000, 99_999)))
    placed: list[tuple[float, str]] = []
    chains, first_depth = [], 0.0
    for chain, value in enumerate(values):
        chain_names = [next(names) for _ in range(VT_HOPS + 1)]
        chains.append(chain_names)
        low, high = setting.depths if chain == 0 else (0.0, 1.0)
        depths = sorted(rng.uniform(low, high) for _ in chain_names)
        first_depth = depths[0] if chain == 0 else first_depth
        statements = [first.format(name=chain_names[0], value=value)]
        statements += [copy.format(name=n, source=s) for s, n in itertools.pairwise(chain_names)]
        placed += zip(depths, statements, strict=True)
    placed.sort()
    phrasing = _fill(rng.choice(_VT_PHRASINGS[setting.group]), value=values[0], count=VT_HOPS + 1)
    return Task("variable_tracking", phrasing, tuple(s for _, s in placed), tuple(d for d, _ in placed),
                tuple(chains[0]), depth=first_depth)  # fmt: skip


def common_words(rng: random.Random, setting: TaskSetting) -> Task:
    """A numbered list, one word a line, filling the budget: `CWE_COMMON` words `CWE_RATIO` times as frequent as the
    others (each of which occurs the same number of times)."""
    phrasing = _fill(rng.choice(_CWE_PHRASINGS[setting.group]), **_counted(CWE_COMMON, "word"))
    seed = rng.random()

    def build(entries: int) -> tuple[str, list[str]]:
        draw = random.Random(seed)
        # `uncommon` words of `rare` occurrences each and CWE_COMMON of CWE_RATIO * rare make about `entries` in all.
        entries = max(entries, 4 * CWE_COMMON * CWE_RATIO)
        rare = max(1, entries // (8 * CWE_COMMON * CWE_RATIO))
        uncommon = max(1, (entries - CWE_COMMON * CWE_RATIO * rare) // rare)
        words = _apart(draw, setting.words, CWE_COMMON + uncommon)
        items = [w for w in words[:CWE_COMMON] for _ in range(CWE_RATIO * rare)]
        items += [w for w in words[CWE_COMMON:] for _ in range(rare)]
        draw.shuffle(items)
        return "\n".join(f"{i}. {w}" for i, w in enumerate(items, 1)), words[:CWE_COMMON]

    body, answers = _fit(build, phrasing, setting)
    return Task("common_words", phrasing, (), (), tuple(answers), body=(body,))


def frequent_words(rng: random.Random, setting: TaskSetting) -> Task:
    """Coded words (random letters) with Zipf frequencies (rank r occurs ∝ 1/r², RULER's alpha 2), strictly
    decreasing over the first `FWE_ANSWERS + 1` ranks, in random order and separated by dots, filling the budget."""
    phrasing = _fill(rng.choice(_FWE_PHRASINGS[setting.group]), **_counted(FWE_ANSWERS, "coded word"))
    # Five letters each, like RULER's variable names: no coded word holds another, so string matching is exact.
    vocabulary = _distinct(rng, 40, lambda: "".join(rng.choices(string.ascii_lowercase, k=5)))
    seed = rng.random()

    def build(entries: int) -> tuple[str, list[str]]:
        weights = [1 / r**2 for r in range(1, len(vocabulary) + 1)]
        counts = [max(1, int(max(entries, 60) * w / sum(weights))) for w in weights]
        for r in range(FWE_ANSWERS, 0, -1):  # a strict order where it is asked, so the answer is unique
            counts[r - 1] = max(counts[r - 1], counts[r] + 2)
        items = [w for w, c in zip(vocabulary, counts, strict=True) for _ in range(c)]
        random.Random(seed).shuffle(items)
        return " .... ".join(items), vocabulary[:FWE_ANSWERS]

    body, answers = _fit(build, phrasing, setting)
    return Task("frequent_words", phrasing, (), (), tuple(answers), body=(body,))


def _fit(build: Callable[[int], tuple[str, list[str]]], phrasing: Phrasing,
         setting: TaskSetting) -> tuple[str, list[str]]:  # fmt: skip
    """`build(entries)` for the entries that fill the budget left by the phrasing: a first guess, measured, scaled."""
    budget = setting.budget - _phrasing_tokens(phrasing, setting)
    entries = max(1, budget // 4)
    for _ in range(2):
        body = build(entries)[0]
        entries = max(1, round(entries * budget / max(1, setting.count_tokens(body))))
    return build(entries)


FAMILIES: dict[str, Callable[[random.Random, TaskSetting], Task]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}
BODY_FAMILIES = ("common_words", "frequent_words")  # no filler: their word lists are the haystack


def check_families(families: Sequence[str], name: str = "families") -> None:
    """Raise a `ValueError` unless `families` names one or more task families, each once."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families or len(set(families)) != len(families):
        raise ValueError(
            f"{name} must name one or more of {', '.join(FAMILIES)}, each once; got {' '.join(families) or 'none'}"
        )


def phrasings(group: Group) -> dict[str, tuple[str, ...]]:
    """Every template of `group`, by what it phrases (needles, assignments and each family's questions)."""
    templates: dict[str, tuple[str, ...]] = {
        "needles": _NEEDLES[group],
        "assignments": tuple(t for pair in _ASSIGNMENTS[group] for t in pair),
    }
    for name, table in (("niah", _NIAH_PHRASINGS), ("vt", _VT_PHRASINGS), ("cwe", _CWE_PHRASINGS),
                        ("fwe", _FWE_PHRASINGS)):  # fmt: skip
        templates[name] = tuple(t for p in table[group] for t in (p.preamble, p.question, p.answer_prefix) if t)
    return templates


def group_names(group: Group) -> dict[str, tuple[str, ...]]:
    """The key parts and value words of `group`."""
    return {"adjectives": _ADJECTIVES[group], "nouns": _NOUNS[group], "value_words": _VALUE_WORDS[group]}


def _counted(count: int, noun: str) -> dict[str, str]:
    """The fields of a word-list question about the `count` most frequent words."""
    one = count == 1
    words = noun if one else f"{count} {noun}s"
    return {"words": words, "coded": words, "be": "is" if one else "are", "appear": "appears" if one else "appear",
            "occur": "occurs" if one else "occur"}  # fmt: skip


def _fill(phrasing: Phrasing, **fields: object) -> Phrasing:
    return Phrasing(*(t.format(**fields) for t in (phrasing.preamble, phrasing.question, phrasing.answer_prefix)))


def _phrasing_tokens(phrasing: Phrasing, setting: TaskSetting) -> int:
    return setting.count_tokens(" ".join((phrasing.preamble, phrasing.question, phrasing.answer_prefix)))


def _apart(rng: random.Random, pool: Sequence[str], count: int) -> list[str]:
    """`count` words of `pool` in random order, none inside another (so a reply naming one never matches another)."""
    chosen: list[str] = []
    for word in rng.sample(pool, len(pool)):
        if not any(word in other or other in word for other in chosen):
            chosen.append(word)
            if len(chosen) == count:
                return chosen
    raise ValueError(f"the word pool holds fewer than {count} words none of which contains another")


def _distinct(rng: random.Random, count: int, draw: Callable[[], str]) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen[draw()] = None
    return list(seen)
