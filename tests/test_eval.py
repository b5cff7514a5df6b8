"""Evaluation: the metrics, the baseline masks, and `evaluate` end to end on a tiny model."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from leank_hf import LeanKCache, LeanKMasks, ModelSpec, WindowConfig, select_channels
from leank_hf.compat import CACHE_ARGUMENT
from leank_hf.eval import FULL_CACHE, EvaluationArguments, evaluate, format_table, plot_accuracy, standard_methods
from leank_hf.eval.metrics import answers_correctly, decoded_logits, heldout_windows, next_token_agreement
from leank_hf.eval.prose import prose_text
from leank_hf.methods import random_masks, think_masks

from .conftest import tiny_llama, tiny_model
from .helpers import independent_scores


def test_agreement_metrics():
    reference = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    assert next_token_agreement(reference, reference) == (0.0, 1.0)
    other = torch.tensor([[0.0, 2.0, -1.0], [0.0, 3.0, 0.0]])
    kl, top1 = next_token_agreement(reference, other)
    p, q = reference[0].softmax(-1), other[0].softmax(-1)
    assert math.isclose(kl, float((p * (p / q).log()).sum()) / 2, rel_tol=1e-5)
    assert top1 == 0.5


def test_decoded_logits_with_the_full_cache_equal_one_forward():
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    decoded = decoded_logits(model, ids, DynamicCache(config=model.config), positions=10)
    with torch.no_grad():
        full = model(ids).logits[0, -10:]
    torch.testing.assert_close(decoded, full, rtol=1e-4, atol=1e-5)


def test_think_keeps_each_heads_channels_with_largest_query_times_key_norm():
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 48), generator=torch.Generator().manual_seed(1))
    masks = think_masks(model, ids, keep_ratio=0.3, window=8, sink=4, recent=16)
    assert (masks.kept_counts == round(0.3 * 32)).all() and masks.align == 1
    assert (masks.sink, masks.recent, masks.method["name"]) == (4, 16, "think")

    # Independent scores: ‖q_c‖ over the last 8 queries of the group's heads times ‖k_c‖ over all keys.
    for layer in range(model.config.num_hidden_layers):
        q, k = _post_rope_qk(model, ids, layer)
        q_norm = q[0, :, -8:].reshape(2, -1, 32).norm(dim=1)
        score = q_norm * k[0].norm(dim=1)
        expected = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(10, dim=-1).indices, True)
        assert torch.equal(masks.channel_mask[layer], expected)
    LeanKCache(masks, model)


def _post_rope_qk(model, ids, layer_index):
    """Post-RoPE q and k of one layer, recomputed from its projections."""
    captured = {}

    def capture(module, args, kwargs):
        captured.update(kwargs)

    attn = model.model.layers[layer_index].self_attn
    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    hidden, (cos, sin) = captured["hidden_states"], captured["position_embeddings"]
    batch, tokens, _ = hidden.shape
    q = attn.q_proj(hidden).view(batch, tokens, -1, 32).transpose(1, 2)
    k = attn.k_proj(hidden).view(batch, tokens, -1, 32).transpose(1, 2)
    with torch.no_grad():
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_random_masks_are_aligned_reproducible_and_random():
    spec = ModelSpec.from_config(tiny_model("llama").config)
    first, again, other = (random_masks(spec, 0.5, seed=s) for s in (0, 0, 1))
    assert first == again and first != other
    assert first.keep_ratio == 0.5 and (first.kept_counts % 16 == 0).all()


def test_calibration_baseline_uses_training_prose(smollm2_tokenizer):
    model = tiny_llama(len(smollm2_tokenizer))
    methods = standard_methods(model, smollm2_tokenizer, baselines=["calibration"],
                               windows=WindowConfig(sink=4, recent=16), calibration_tokens=256)  # fmt: skip
    masks = methods["calibration"](0.5, None)
    assert masks is methods["calibration"](0.5, None), "computed once per ratio"
    ids = smollm2_tokenizer(prose_text("train"), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :256]
    expected = select_channels(independent_scores(model, ids, torch.ones_like(ids)), 0.5, 16)
    assert torch.equal(masks.channel_mask, expected)
    with pytest.raises(ValueError, match="unknown baselines"):
        standard_methods(model, smollm2_tokenizer, baselines=["oracle"])


def test_evaluate_end_to_end(smollm2_tokenizer, tmp_path):
    """Keep-all masks reproduce the full cache exactly; random masks at 20 % do not; everything is reported."""
    model = tiny_llama(len(smollm2_tokenizer))
    spec = ModelSpec.from_model(model)
    keep_all = LeanKMasks(torch.ones(2, 2, 32, dtype=torch.bool), sink=4, recent=16, block_size=8)
    methods = {
        "keep all": lambda ratio, prompt: keep_all,
        "random": lambda ratio, prompt: random_masks(spec, ratio, sink=4, recent=16, block_size=8),
        "only at 0.5": lambda ratio, prompt: keep_all if ratio == 0.5 else None,
    }
    measured = EvaluationArguments(keep_ratios=[0.5, 0.2], text_tokens=160, positions=24, texts=2,
                                   retrieval_tokens=140, retrieval_tasks=3)  # fmt: skip
    rows = evaluate(model, smollm2_tokenizer, methods, measured)
    assert rows[0]["method"] == FULL_CACHE and rows[0]["full_cache_solved"].endswith("/3")
    by_key = {(r["method"], r["keep_ratio"]): r for r in rows}
    assert set(by_key) == {(FULL_CACHE, 1.0), ("keep all", 0.5), ("keep all", 0.2), ("random", 0.5),
                           ("random", 0.2), ("only at 0.5", 0.5)}  # fmt: skip
    for ratio in (0.5, 0.2):
        assert by_key["keep all", ratio]["kl"] < 1e-6 and by_key["keep all", ratio]["top1"] == 1.0
    assert by_key["random", 0.2]["kl"] > 1e-4
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| random | 0.20 |" in table
    plot_accuracy(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_evaluate_scores_retrieval_only_on_tasks_the_full_cache_solves(smollm2_tokenizer, monkeypatch):
    """The random tiny model solves no task, so `test_evaluate_end_to_end` never counts one: here the answer check is
    scripted (the full cache solves tasks 0 and 2; keep-all masks answer, random ones do not) to check the counting."""
    model = tiny_llama(len(smollm2_tokenizer))
    spec = ModelSpec.from_model(model)
    keep_all = LeanKMasks(torch.ones(2, 2, 32, dtype=torch.bool), sink=4, recent=16, block_size=8)
    full_cache_answers, full_cache_tasks, asked = [True, False, True], [], []

    def scripted(model, tokenizer, prompt_ids, answer, cache):
        if isinstance(cache, LeanKCache):
            asked.append(prompt_ids)
            return cache.masks is keep_all
        full_cache_tasks.append(prompt_ids)
        return full_cache_answers[len(full_cache_tasks) - 1]

    monkeypatch.setattr("leank_hf.eval.evaluation.answers_correctly", scripted)
    methods = {
        "keep all": lambda ratio, prompt: keep_all,
        "random": lambda ratio, prompt: random_masks(spec, ratio, sink=4, recent=16, block_size=8),
    }
    measured = EvaluationArguments(keep_ratios=[0.5], text_tokens=160, positions=24, texts=1, retrieval_tokens=140,
                                   retrieval_tasks=3)  # fmt: skip
    run = functools.partial(evaluate, model, smollm2_tokenizer, methods, measured)
    rows = run()
    assert rows[0]["full_cache_solved"] == "2/3"
    assert {r["method"]: r["retrieval"] for r in rows[1:]} == {"keep all": 1.0, "random": 0.0}
    solved = [full_cache_tasks[0], full_cache_tasks[2]]
    assert asked == solved * 2, "each method is asked the solved tasks only"

    full_cache_answers[:] = [False] * 3  # now the full cache solves nothing
    full_cache_tasks.clear()
    rows = run()
    assert rows[0]["full_cache_solved"] == "0/3" and [r["retrieval"] for r in rows[1:]] == [None, None]


def test_answers_correctly_reads_only_the_generated_text(smollm2_tokenizer):
    """Retrieval prompts contain their answer: only the tokens generated after the prompt may count."""
    prompt = smollm2_tokenizer("The code is 7311. Other text. What is the code?", add_special_tokens=False)
    prompt_ids = prompt["input_ids"]

    class Scripted:
        device = torch.device("cpu")
        reply = ""

        def generate(self, ids, max_new_tokens, do_sample, **kwargs):
            assert kwargs[CACHE_ARGUMENT] == "the cache" and not do_sample
            assert max_new_tokens > len(smollm2_tokenizer("7311", add_special_tokens=False)["input_ids"])
            reply = smollm2_tokenizer(self.reply, add_special_tokens=False, return_tensors="pt")["input_ids"]
            return torch.cat([ids, reply], dim=1)

    model = Scripted()
    model.reply = " The code is 7311."
    assert answers_correctly(model, smollm2_tokenizer, prompt_ids, "7311", "the cache")
    model.reply = " I do not know."
    assert not answers_correctly(model, smollm2_tokenizer, prompt_ids, "7311", "the cache")


def test_heldout_windows(smollm2_tokenizer):
    windows = heldout_windows(smollm2_tokenizer, 512, 3)
    assert [w.shape for w in windows] == [(1, 512)] * 3
    assert not torch.equal(windows[0], windows[-1])
    with pytest.raises(ValueError, match="fewer than"):
        heldout_windows(smollm2_tokenizer, 10**6, 1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"keep_ratios": [0.3, 1.5]}, r"keep_ratios must be in \(0, 1\], got 1.5"),
        ({"texts": 0}, "texts must be an integer > 0"),
        ({"positions": 4096, "text_tokens": 4096}, "positions (4096) must be below text_tokens (4096)"),
        ({"retrieval_depths": [0.9, 0.5]}, "retrieval_depths must be two relative depths LOW HIGH"),
        ({"retrieval_depths": [0.5]}, "retrieval_depths must be two relative depths"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"ruler_tokens": [2048, 200]}, "ruler_tokens must be an integer >= 256, got 200"),
        ({"ruler_tokens": []}, "ruler_tokens must name one or more prompt lengths"),
        ({"ruler_tasks": 0}, "ruler_tasks must be an integer > 0"),
        ({"ruler_families": ["niah_single", "qa"]}, "ruler_families must name one or more of niah_single"),
        ({"ruler_families": ["niah_single", "niah_single"]}, "each once"),
    ],
)
def test_evaluation_arguments_name_the_bad_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("(4096)", r"\(4096\)")):
        EvaluationArguments(**fields)
