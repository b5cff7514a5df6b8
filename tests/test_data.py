"""The shipped prose and `make_retrieval_dataset`."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from leank_hf.eval.prose import prose_paragraphs
from leank_hf.eval.retrieval import IGNORE_INDEX
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
    data = make_retrieval_dataset(tokenizer, lengths=(2000, 2600), n=12, facts=(2, 4), seed=3)
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


def test_examples_are_reproducible_and_split_aware(smollm2_tokenizer):
    first = make_retrieval_dataset(smollm2_tokenizer, lengths=(300, 400), n=4, seed=1)
    again = make_retrieval_dataset(smollm2_tokenizer, lengths=(300, 400), n=4, seed=1)
    assert [first[i] for i in range(4)] == [again[i] for i in range(4)]
    assert first[0] != first[1]
    heldout = make_retrieval_dataset(smollm2_tokenizer, lengths=(300, 400), n=4, seed=1, split="heldout")
    train_text = "".join(smollm2_tokenizer.decode(first.example(i).prompt_ids) for i in range(4))
    heldout_text = smollm2_tokenizer.decode(heldout.example(0).prompt_ids)
    assert not any(p[:60] in train_text for p in prose_paragraphs("heldout"))
    assert any(p[:60] in heldout_text for p in prose_paragraphs("heldout"))


def test_tokenizers_without_a_chat_template_get_plain_question_and_answer(smollm2_tokenizer):
    plain = PreTrainedTokenizerFast(tokenizer_object=smollm2_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    assert plain.chat_template is None
    example = make_retrieval_dataset(plain, lengths=(200, 300), n=1).example(0)
    assert plain.decode(example.prompt_ids).endswith(f"Question: {example.question}\nAnswer:")
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
