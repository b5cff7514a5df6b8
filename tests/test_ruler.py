"""The RULER-style suite (`leank_hf.eval.ruler`, task families in `leank_hf.eval.tasks`): seeded tasks whose answers
an independent reading of the prompt finds, string-match scoring, the per-family rows of `evaluate_ruler`, their
table and plot, and the disjointness of its texts, names and phrasings from every kind of training data."""

from __future__ import annotations

import collections
import re

import pytest
import torch

from leank_hf import LeanKCache, LeanKMasks, ModelSpec
from leank_hf.eval import FULL_CACHE, EvaluationArguments, evaluate_ruler, format_ruler_table, plot_ruler
from leank_hf.eval import retrieval as legacy
from leank_hf.eval.metrics import solves_task, string_match_all
from leank_hf.eval.prose import NOISE, SUITE_TEXTS, TRAINING_TEXTS, text_paragraphs
from leank_hf.eval.retrieval import training_words
from leank_hf.eval.ruler import RULER_FAMILIES, make_ruler_suite, suite_words
from leank_hf.eval.tasks import CWE_COMMON, FWE_ANSWERS, VT_HOPS, group_names, phrasings, word_pool
from leank_hf.kv_quantization import KVQuantization
from leank_hf.methods import random_masks

from .conftest import tiny_llama

TOKENS = 420  # short tasks: the families' logic does not depend on the length


@pytest.fixture(scope="module")
def suite(smollm2_tokenizer):
    return make_ruler_suite(smollm2_tokenizer, TOKENS, 4, seed=5)


def test_suite_is_seeded_and_reproducible(smollm2_tokenizer, suite):
    again = make_ruler_suite(smollm2_tokenizer, TOKENS, 4, seed=5)
    assert [t.prompt_ids for t in again] == [t.prompt_ids for t in suite] and again == suite
    other = make_ruler_suite(smollm2_tokenizer, TOKENS, 4, seed=6)
    assert all(a.prompt_ids != b.prompt_ids for a, b in zip(other, suite, strict=True))
    assert [t.family for t in suite] == [f for f in RULER_FAMILIES for _ in range(4)]
    for task in suite:
        # Short of the length by less than a filler paragraph (at most ~125 tokens), and word lists fill it.
        assert TOKENS - 130 <= len(task.prompt_ids) <= 1.15 * TOKENS, (task.family, len(task.prompt_ids))
        assert task.text in (SUITE_TEXTS if task.num_facts else (None,))
    assert {t.text for t in suite if t.family == "niah_single"} == set(SUITE_TEXTS), "the haystacks alternate"
    assert len({t.question for t in suite}) > len(RULER_FAMILIES), "several phrasings"


def test_every_family_hides_its_answers(smollm2_tokenizer, suite):
    """An independent reading of each prompt (regular expressions over the decoded text, counting, following the
    variable chains) finds exactly the task's answers, and only one right reply."""
    kinds = collections.Counter()
    for task in suite:
        text = smollm2_tokenizer.decode(task.prompt_ids)
        user = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        question = user.rsplit("\n\n", 1)[1]
        assert task.question == question and not any(a.lower() in question.lower() for a in task.answers)
        if task.family.startswith("niah"):
            needles = _needles(user)
            asked = re.findall(r"[a-z]+-[a-z]+", question)
            assert asked and set(asked) <= {key for key, _ in needles}
            assert task.answers == tuple(value for key, value in needles if key in asked)
            assert len(needles) == task.num_facts
            expected = {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 2, "niah_multiquery": 2}
            assert len(task.answers) == expected[task.family]
            kinds.update("number" if a.isdigit() else "uuid" if "-" in a else "word" for a in task.answers)
        elif task.family == "variable_tracking":
            (value,) = re.findall(r"\d{5}", question)
            assert set(task.answers) == _holding(user, value) and len(task.answers) == VT_HOPS + 1
        elif task.family == "common_words":
            counts = collections.Counter(re.findall(r"^\d+\. ([a-z]+)$", user, flags=re.MULTILINE))
            _assert_top(counts, task.answers, CWE_COMMON)
        else:
            coded = user.split("\n\n")[1] if user.count("\n\n") > 1 else user.split("\n\n")[0]
            counts = collections.Counter(w for w in coded.split(" ") if w != "....")
            _assert_top(counts, task.answers, FWE_ANSWERS)
    assert set(kinds) == {"number", "uuid", "word"}


def _needles(user: str) -> list[tuple[str, str]]:
    """(key, value) of every needle of the suite's phrasings, in document order."""
    patterns = [
        r"One of the special magic \w+ for (?P<key>[a-z]+-[a-z]+) is: (?P<value>[\w-]+)\.",
        r"Remember that (?P<value>[\w-]+) is one of the special magic \w+ for (?P<key>[a-z]+-[a-z]+)\.",
        r"The text hides a special magic \w+ for (?P<key>[a-z]+-[a-z]+): (?P<value>[\w-]+)\.",
    ]
    found = [(m.start(), m["key"], m["value"]) for p in patterns for m in re.finditer(p, user)]
    return [(key, value) for _, key, value in sorted(found)]


def _holding(user: str, value: str) -> set[str]:
    """The variables that end up holding `value`, following the assignments in order."""
    held: dict[str, str] = {}
    for name, source in re.findall(r"(?:VAR |Set )([A-Z]{5}) (?:=|to) (?:VAR |the value of )?([A-Z]{5}|\d{5})", user):
        held[name] = held[source] if source.isalpha() else source
    return {name for name, held_value in held.items() if held_value == value}


def _assert_top(counts: collections.Counter, answers: tuple[str, ...], top: int) -> None:
    ranked = counts.most_common()
    assert set(answers) == {word for word, _ in ranked[:top]} and len(answers) == top
    assert ranked[top - 1][1] > ranked[top][1], "a unique answer"


def test_string_match_all_is_rulers_score():
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("only 1234567", ["1234567", "7654321"]) == 0.5
    assert string_match_all("ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0, "case is ignored"
    assert string_match_all("nothing", ["x"]) == 0.0


def test_solves_task_needs_every_answer_in_the_generated_text(smollm2_tokenizer):
    prompt_ids = smollm2_tokenizer("VAR ABCDE = 12345. VAR FGHIJ = VAR ABCDE.", add_special_tokens=False)["input_ids"]

    class Scripted:
        device = torch.device("cpu")
        reply = ""

        def generate(self, ids, max_new_tokens, do_sample, **kwargs):
            assert max_new_tokens >= len(smollm2_tokenizer("ABCDE, FGHIJ", add_special_tokens=False)["input_ids"])
            reply = smollm2_tokenizer(self.reply, add_special_tokens=False, return_tensors="pt")["input_ids"]
            return torch.cat([ids, reply], dim=1)

    model = Scripted()
    for reply, right in ((" abcde and fghij", True), (" ABCDE", False), (" none", False)):
        model.reply = reply
        assert solves_task(model, smollm2_tokenizer, prompt_ids, ("ABCDE", "FGHIJ"), "cache") is right, reply


def test_evaluate_ruler_counts_only_tasks_the_full_cache_solves(smollm2_tokenizer, monkeypatch):
    """Scripted answers (the full cache solves every other task; keep-all masks answer, random ones do not) check
    the counting per family, the pooled rows, the quantized rows' names and the methods without masks."""
    model = tiny_llama(len(smollm2_tokenizer))
    spec = ModelSpec.from_model(model)
    keep_all = LeanKMasks(torch.ones(2, 2, 32, dtype=torch.bool), sink=4, recent=16, block_size=8)
    full_cache_tasks, asked = [], []

    def scripted(model, tokenizer, prompt_ids, answers, cache):
        if isinstance(cache, LeanKCache):
            asked.append(prompt_ids)
            return cache.masks is keep_all
        full_cache_tasks.append(prompt_ids)
        return len(full_cache_tasks) % 2 == 1

    monkeypatch.setattr("leank_hf.eval.ruler.solves_task", scripted)
    methods = {
        "keep all": lambda ratio, prompt: keep_all,
        "random": lambda ratio, prompt: random_masks(spec, ratio, sink=4, recent=16, block_size=8),
        "only at 0.5": lambda ratio, prompt: keep_all if ratio == 0.5 else None,
    }
    families = ["niah_single", "common_words"]
    measured = EvaluationArguments(keep_ratios=[0.5, 0.2], ruler_tokens=[300], ruler_tasks=3, ruler_families=families)
    rows = evaluate_ruler(model, smollm2_tokenizer, methods, measured, KVQuantization(kv_bits=4))
    by_key = {(r["method"], r["keep_ratio"], r["family"]): r for r in rows}
    full = {f: by_key[FULL_CACHE, 1.0, f]["full_cache_solved"] for f in [*families, "all"]}
    assert full == {"niah_single": "2/3", "common_words": "1/3", "all": "3/6"}
    assert by_key["keep all int4", 0.2, "niah_single"] == {
        "method": "keep all int4", "keep_ratio": 0.2, "tokens": 300, "family": "niah_single", "kept": 1.0,
        "solved": 2, "tasks": 2,
    }  # fmt: skip
    assert by_key["random int4", 0.5, "all"]["kept"] == 0.0 and by_key["random int4", 0.5, "all"]["tasks"] == 3
    assert ("only at 0.5 int4", 0.2, "all") not in by_key and by_key["only at 0.5 int4", 0.5, "all"]["kept"] == 1.0
    solved = full_cache_tasks[0::2]
    assert asked == solved * 5, "each method, at each ratio it has masks for, is asked the solved tasks only"
    table = format_ruler_table(rows)
    assert table.splitlines()[0] == "| tokens | method | keep ratio | niah_single | common_words | all |"
    assert "| 300 | full cache | 1.00 | 2/3 | 1/3 | 3/6 |" in table
    assert "| 300 | random int4 | 0.20 | 0.00 (0/2) | 0.00 (0/1) | 0.00 (0/3) |" in table
    assert len(table.splitlines()) == 2 + 1 + 5


def test_ruler_plot(tmp_path):
    rows = [
        {"method": FULL_CACHE, "keep_ratio": 1.0, "tokens": t, "family": f, "kept": 1.0, "solved": 4, "tasks": 5,
         "full_cache_solved": "4/5"} for t in (2048, 4096) for f in ("niah_single", "all")
    ] + [
        {"method": m, "keep_ratio": r, "tokens": t, "family": f, "kept": k, "solved": 0, "tasks": 4}
        for t in (2048, 4096) for f in ("niah_single", "all") for m, k in (("learned", 1.0), ("random", None))
        for r in (0.3, 0.5)
    ]  # fmt: skip
    plot_ruler(rows, tmp_path / "ruler.png")
    assert (tmp_path / "ruler.png").read_bytes().startswith(b"\x89PNG")


def test_names_and_phrasings_of_training_and_test_groups_are_disjoint():
    train, test = phrasings("train"), phrasings("test")
    assert set(train) == set(test) and all(train[k] and test[k] for k in train)
    assert not {t for v in train.values() for t in v} & {t for v in test.values() for t in v}
    assert all(len(test[k]) >= 2 for k in ("niah", "vt", "cwe", "fwe")), "several phrasings of each question"
    train_names, test_names = group_names("train"), group_names("test")
    shipped = {*legacy._ADJECTIVES, *legacy._NOUNS, *legacy._WORDS}  # the "facts" mixture's names
    for part in train_names:
        assert not set(train_names[part]) & set(test_names[part])
        assert not set(test_names[part]) & shipped, part
    every = [w for names in (train_names, test_names) for part in names.values() for w in part]
    assert not [(a, b) for a in every for b in every if a != b and a in b], "no name inside another"


def test_texts_and_words_of_training_and_test_data_are_disjoint():
    for name in TRAINING_TEXTS:
        shared = set(text_paragraphs(name, "train")) & set(text_paragraphs(name, "heldout"))
        # Only the play's repeated headings and stage directions ("SCENE II. The forest.", "[Exit]") recur.
        assert all(p.startswith(("SCENE", "[")) and len(p) < 40 for p in shared), shared
    training = {p for name in TRAINING_TEXTS for s in ("train", "heldout") for p in text_paragraphs(name, s)}
    suite_text = " ".join(p for name in SUITE_TEXTS for p in text_paragraphs(name))
    assert not any(p[:60] in suite_text for p in training)
    training_text = " ".join(training)
    assert not any(p[:60] in training_text for p in text_paragraphs("paradise_lost")) and NOISE not in training_text
    train, heldout, suite = training_words("train"), training_words("heldout"), suite_words()
    assert not set(train) & set(heldout) and not set(suite) & (set(train) | set(heldout))
    assert not set(suite) & set(word_pool(list(training))), "the suite's word lists use no word of a training text"
    assert min(len(train), len(heldout), len(suite)) > 400
    with pytest.raises(ValueError, match="split must be"):
        text_paragraphs("alice", None)
    with pytest.raises(ValueError, match="no shipped text"):
        text_paragraphs("hamlet")
