"""The shipped prose and `make_retrieval_dataset`."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from transformers import PreTrainedTokenizerFast

from leank_hf.eval.prose import SUITE_TEXTS, TRAINING_TEXTS, prose_paragraphs, text_paragraphs
from leank_hf.eval.retrieval import IGNORE_INDEX, MIXTURES
from leank_hf.eval.tasks import FAMILIES, group_names
from leank_hf.training import make_retrieval_dataset


def test_prose_splits_are_disjoint_whole_chapters():
    train, heldout = prose_paragraphs("train"), prose_paragraphs("heldout")
    assert train[0].startswith("CHAPTER I.") and heldout[0].startswith("CHAPTER X.")
    assert sum(p.startswith("CHAPTER") for p in train) == 9 and sum(p.startswith("CHAPTER") for p in heldout) == 3
    assert not set(train) & set(heldout)
    assert len(set(train)) > 500, "real prose, not a repeated sentence"
    with pytest.raises(ValueError, match="split"):
        prose_paragraphs("test")


def test_examples_hide_facts_in_prose_and_label_only_the_answer(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    data = make_retrieval_dataset(tokenizer, lengths=(2000, 2600), n=12, facts=(2, 4), seed=3, mixture="facts")
    kinds = set()
    for index in range(len(data)):
        example, item = data.example(index), data[index]
        assert 2000 * 0.9 <= len(example.prompt_ids) <= 2600 * 1.05
        assert item["input_ids"] == example.prompt_ids + example.answer_ids
        assert item["attention_mask"] == [1] * len(item["input_ids"])
        labelled = [t for t in item["labels"] if t != IGNORE_INDEX]
        assert labelled == example.answer_ids and item["labels"][: len(example.prompt_ids)] == [IGNORE_INDEX] * len(
            example.prompt_ids
        )
        assert tokenizer.decode(example.answer_ids) == f"{example.answer}<|im_end|>"
        prompt = tokenizer.decode(example.prompt_ids)
        assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
        assert prompt.count("(Remember this: the secret") == example.num_facts >= 2
        assert f"is {example.answer}.)" in prompt and example.question in prompt
        fact_at = prompt.index(f"is {example.answer}.)") / len(prompt)
        assert abs(fact_at - example.depth) < 0.12, "the asked fact sits at its depth (to a paragraph)"
        kinds.add("number" if example.answer.isdigit() else "code" if "-" in example.answer else "word")
    assert kinds == {"number", "code", "word"}


@pytest.mark.parametrize("mixture", MIXTURES)
def test_examples_are_reproducible_and_split_aware(smollm2_tokenizer, mixture):
    first = make_retrieval_dataset(smollm2_tokenizer, lengths=(300, 400), n=4, seed=1, mixture=mixture)
    again = make_retrieval_dataset(smollm2_tokenizer, lengths=(300, 400), n=4, seed=1, mixture=mixture)
    assert [first[i] for i in range(4)] == [again[i] for i in range(4)]
    assert first[0] != first[1]
    heldout = make_retrieval_dataset(smollm2_tokenizer, lengths=(300, 400), n=4, seed=1, split="heldout",
                                     mixture="facts")  # fmt: skip
    train_text = "".join(smollm2_tokenizer.decode(first.example(i).prompt_ids) for i in range(4))
    heldout_text = smollm2_tokenizer.decode(heldout.example(0).prompt_ids)
    assert not any(p[:60] in train_text for p in prose_paragraphs("heldout"))
    assert any(p[:60] in heldout_text for p in prose_paragraphs("heldout"))


def test_tokenizers_without_a_chat_template_get_plain_question_and_answer(smollm2_tokenizer):
    plain = PreTrainedTokenizerFast(tokenizer_object=smollm2_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    assert plain.chat_template is None
    example = make_retrieval_dataset(plain, lengths=(200, 300), n=1, mixture="facts").example(0)
    assert plain.decode(example.prompt_ids).endswith(f"Question: {example.question}\nAnswer:")
    assert plain.decode(example.answer_ids) == f" {example.answer}<|im_end|>"
    data = make_retrieval_dataset(plain, lengths=(300, 400), n=6)
    for example in map(data.example, range(6)):
        prompt = plain.decode(example.prompt_ids)
        reply_start = prompt.split(f"{example.question}\n")[1]  # "Answer:", or the phrasing's start of the reply
        assert reply_start == "Answer:" or (reply_start and "\n" not in reply_start)
        assert plain.decode(example.answer_ids) == f" {example.answer}<|im_end|>"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lengths": (500, 100)}, "lengths"),
        ({"facts": (0, 2)}, "facts"),
        ({"depths": (0.5, 1.5)}, "depths"),
        ({"n": 0}, "n must be positive"),
    ],
)
def test_bad_arguments_are_named(smollm2_tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_retrieval_dataset(smollm2_tokenizer, **{"lengths": (100, 200), **kwargs})
    with pytest.raises(IndexError):
        make_retrieval_dataset(smollm2_tokenizer, lengths=(100, 200), n=2).example(2)


def test_the_shipped_masks_data_is_unchanged(smollm2_tokenizer):
    """`mixture="facts"` gives token for token the examples of the data the shipped SmolLM2 masks were learned on
    (digests taken before the RULER-style mixture existed), training and held-out (`evaluate`'s retrieval tasks)."""

    def digest(data):
        examples = [data.example(i) for i in range(len(data))]
        blob = json.dumps([[data[i] for i in range(len(data))], [(e.answer, e.question, e.depth, e.num_facts)
                                                                  for e in examples]])  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()

    train = make_retrieval_dataset(smollm2_tokenizer, lengths=(300, 700), n=4, seed=0, mixture="facts")
    heldout = make_retrieval_dataset(smollm2_tokenizer, (700, 700), 3, facts=(1, 3), depths=(0.5, 0.85),
                                     split="heldout", seed=0, mixture="facts")  # fmt: skip
    assert digest(train) == "bd0d6779281bedc4c99f7f1f2d2c3d0e3b603a9aa2bc476cc57869e0086f3912"
    assert digest(heldout) == "70ec534616a07cfd6d55c2ad3da2133e3aa7c998a352fc24c7656982050804d3"


@pytest.fixture(scope="module")
def ruler_splits(smollm2_tokenizer):
    """28 examples of each split of the RULER-style mixture, with their decoded prompts."""
    data = {s: make_retrieval_dataset(smollm2_tokenizer, lengths=(450, 700), n=28, split=s, seed=2)
            for s in ("train", "heldout")}  # fmt: skip
    return {
        s: [(e, smollm2_tokenizer.decode(e.prompt_ids)) for e in map(d.example, range(28))] for s, d in data.items()
    }


def test_ruler_mixture_draws_every_family_and_text_and_labels_only_the_answer(smollm2_tokenizer, ruler_splits):
    for split, examples in ruler_splits.items():
        assert {e.family for e, _ in examples} == set(FAMILIES), split
        assert {e.text for e, _ in examples} == {*TRAINING_TEXTS, None}, split
        for example, prompt in examples:
            reply_start = prompt.split("<|im_start|>assistant\n")[1]  # empty, or the phrasing's start of the reply
            assert prompt.startswith("<|im_start|>system") and "\n" not in reply_start
            assert smollm2_tokenizer.decode(example.answer_ids).strip() == f"{example.answer}<|im_end|>"
            assert example.answer == ", ".join(example.answers) and example.question in prompt
            assert len(example.prompt_ids) >= 450 - 130 and len(example.prompt_ids) <= 700 * 1.15
            if example.num_facts:
                assert all(a in prompt for a in example.answers), "the needles are in the prompt"


def test_ruler_mixture_splits_share_no_passage_name_phrasing_or_answer(ruler_splits):
    """The held-out split reads other passages, keys, value words and questions than the training split, and
    neither reads a text of the RULER-style suite."""
    prompts = {s: "\n".join(p for _, p in examples) for s, examples in ruler_splits.items()}
    for split, other in (("train", "heldout"), ("heldout", "train")):
        passages = [p for name in TRAINING_TEXTS for p in text_paragraphs(name, other) if len(p) >= 40]
        assert not any(p[:60] in prompts[split] for p in passages), split
        group, other_group = (group_names(g) for g in (("train", "test") if split == "train" else ("test", "train")))
        asked = re.findall(r"\b([a-z]+)-([a-z]+)\b", " ".join(e.question for e, _ in ruler_splits[split]))
        assert asked and all(a in group["adjectives"] and n in group["nouns"] for a, n in asked), split
        for a, n in re.findall(r"\b([a-z]+)-([a-z]+)\b", prompts[split]):
            assert not (a in other_group["adjectives"] and n in other_group["nouns"]), (split, a, n)
    assert not {e.question for e, _ in ruler_splits["train"]} & {e.question for e, _ in ruler_splits["heldout"]}
    answers = [{a for e, _ in ruler_splits[s] for a in e.answers} for s in ("train", "heldout")]
    assert not answers[0] & answers[1]
    suite = [p for name in SUITE_TEXTS for p in text_paragraphs(name)]
    assert not any(p[:60] in prompts[s] for p in suite for s in prompts)
