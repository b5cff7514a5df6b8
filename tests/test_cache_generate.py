"""LeanKCache inside `generate` on every supported family: the drop-in guarantee and the generate features."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from leank_hf import LeanKCache, LeanKMasks
from leank_hf.compat import cache_kwargs

from .conftest import FAMILIES, tiny_model
from .helpers import WINDOWS, assert_pruned_path_ran, generate_both, keep_all, left_padded_batch, pruned
from .tolerances import assert_close


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_masks_reproduce_dynamic_cache_greedy(family):
    model = tiny_model(family)
    inputs = left_padded_batch([40, 23, 9], model.config.vocab_size)  # row 2's padding is longer than the sink
    dense, leank, cache = generate_both(model, keep_all(model), inputs)
    assert torch.equal(dense, leank)
    assert_pruned_path_ran(cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_masks_keep_the_first_token_and_run(family):
    model = tiny_model(family)
    inputs = left_padded_batch([40, 30], model.config.vocab_size, seed=1)
    dense, leank, cache = generate_both(model, pruned(model), inputs)
    width = inputs["input_ids"].shape[1]
    assert torch.equal(dense[:, : width + 1], leank[:, : width + 1]), "prefill must be exact"
    assert leank.shape == dense.shape
    assert_pruned_path_ran(cache)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode_logits_match_dynamic_cache(family, dtype):
    """Teacher-forced decode: LeanK logits with keep-all masks equal DynamicCache's within the dtype's tolerance."""
    model = tiny_model(family, dtype)
    inputs = left_padded_batch([30, 21], model.config.vocab_size, seed=2)
    tokens = torch.randint(3, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    logits = {}
    for name, cache in (("dense", DynamicCache(config=model.config)), ("leank", LeanKCache(keep_all(model), model))):
        mask = inputs["attention_mask"]
        with torch.no_grad():
            out = [model(**inputs, **cache_kwargs(cache)).logits[:, -1]]
            for step in range(tokens.shape[1]):
                mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
                out.append(model(tokens[:, step : step + 1], attention_mask=mask, **cache_kwargs(cache)).logits[:, -1])
        logits[name] = torch.stack(out)
    assert_close(logits["leank"].float(), logits["dense"].float(), dtype)


def test_sampling_matches_dynamic_cache_with_same_seed():
    model = tiny_model("llama")
    inputs = left_padded_batch([30, 17], model.config.vocab_size)
    torch.manual_seed(7)
    dense = model.generate(**inputs, do_sample=True, max_new_tokens=20, pad_token_id=0)
    torch.manual_seed(7)
    leank = model.generate(
        **inputs, do_sample=True, max_new_tokens=20, pad_token_id=0, **cache_kwargs(LeanKCache(keep_all(model), model))
    )
    assert torch.equal(dense, leank)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_beam_search_with_several_returned_sequences(family):
    model = tiny_model(family)
    inputs = left_padded_batch([30, 17], model.config.vocab_size)
    dense, leank, _ = generate_both(model, keep_all(model), inputs, num_beams=3, num_return_sequences=2)
    assert torch.equal(dense, leank)


def test_num_return_sequences_with_sampling():
    model = tiny_model("qwen2")
    inputs = left_padded_batch([25], model.config.vocab_size)
    torch.manual_seed(3)
    dense = model.generate(**inputs, do_sample=True, num_return_sequences=3, max_new_tokens=16, pad_token_id=0)
    torch.manual_seed(3)
    cache = LeanKCache(keep_all(model), model)
    leank = model.generate(
        **inputs, do_sample=True, num_return_sequences=3, max_new_tokens=16, pad_token_id=0, **cache_kwargs(cache)
    )
    assert torch.equal(dense, leank)


def test_continuing_generation_from_a_filled_cache():
    model = tiny_model("mistral")
    inputs = left_padded_batch([30, 20], model.config.vocab_size)
    results = []
    for cache in (DynamicCache(config=model.config), LeanKCache(keep_all(model), model)):
        first = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=10, do_sample=False, pad_token_id=0)
        follow_up = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(0))
        ids = torch.cat([first, follow_up], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, ids.shape[1] - inputs["attention_mask"].shape[1])], 1)
        results.append(
            model.generate(
                input_ids=ids,
                attention_mask=mask.long(),
                **cache_kwargs(cache),
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
            )
        )
    assert torch.equal(results[0], results[1])


def test_prefill_chunk_size():
    model = tiny_model("qwen3")
    inputs = left_padded_batch([45, 33], model.config.vocab_size)
    dense, leank, cache = generate_both(model, keep_all(model), inputs, prefill_chunk_size=16)
    assert torch.equal(dense, leank)
    assert_pruned_path_ran(cache)


def test_assisted_decoding_crops_within_the_window():
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    motif = torch.randint(3, 90, (6,), generator=generator)
    ids = torch.cat([motif.repeat(6), motif[:3]]).unsqueeze(0)  # repetitive, so prompt lookup proposes tokens
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense, leank, _ = generate_both(model, keep_all(model, recent=16), inputs, prompt_lookup_num_tokens=3)
    assert torch.equal(dense, leank)


def test_from_pretrained_returns_a_fresh_cache_each_call(tmp_path):
    model = tiny_model("llama")
    pruned(model).save_pretrained(tmp_path)
    first, second = LeanKCache.from_pretrained(tmp_path, model), LeanKCache.from_pretrained(tmp_path, model, recent=12)
    assert first is not second
    again = LeanKMasks.from_pretrained(tmp_path)
    assert first.masks == again and first.masks is not again, "equal masks, each caller its own (test_masks: memo)"
    assert second.recent == 12 and first.recent == WINDOWS["recent"]
    inputs = left_padded_batch([20], model.config.vocab_size)
    model.generate(**inputs, **cache_kwargs(first), max_new_tokens=3, pad_token_id=0)
    assert second.get_seq_length() == 0


def test_memory_report_totals_and_savings():
    model = tiny_model("llama")
    inputs = left_padded_batch([120, 100], model.config.vocab_size)
    masks = pruned(model)
    cache = LeanKCache(masks, model)
    model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=10, pad_token_id=0)
    report = cache.memory_report()
    assert len(report.layers) == 3
    assert report.total_bytes == sum(layer.total_bytes for layer in report.layers)
    dense = DynamicCache(config=model.config)
    model.generate(**inputs, **cache_kwargs(dense), max_new_tokens=10, pad_token_id=0)
    assert report.dense_bytes == sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
    assert report.key_bytes < 0.75 * report.dense_bytes / 2
    assert "saved" in str(report) and report.to_markdown().count("\n") == 5


def test_gemma3_sliding_layers_keep_their_own_cache():
    model = tiny_model("gemma3")
    cache = LeanKCache(keep_all(model), model)
    assert [type(layer).__name__ for layer in cache.layers] == [
        "DynamicSlidingWindowLayer",
        "LeanKLayer",
        "DynamicSlidingWindowLayer",
    ]


# ------------------------------------------------------------------------------------------------------ errors
def test_output_attentions_is_refused():
    model = tiny_model("llama")
    inputs = left_padded_batch([12], model.config.vocab_size)
    cache = LeanKCache(keep_all(model), model)
    with pytest.raises(ValueError, match="output_attentions"):
        model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=3, output_attentions=True,
                       return_dict_in_generate=True, pad_token_id=0)  # fmt: skip


def test_filled_cache_reused_with_another_batch_size():
    model = tiny_model("llama")
    cache = LeanKCache(keep_all(model), model)
    model.generate(**left_padded_batch([12, 10], 90), **cache_kwargs(cache), max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="another batch size"):
        model.generate(**left_padded_batch([12, 10, 9], 90), **cache_kwargs(cache), max_new_tokens=2, pad_token_id=0)


def test_unsupported_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    masks = LeanKMasks(torch.ones(1, 2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*model_type='gpt2'"):
        LeanKCache(masks, model)


@pytest.mark.parametrize("shape", [(2, 2, 32), (3, 4, 32), (3, 2, 64)], ids=["layers", "kv_heads", "head_dim"])
def test_masks_for_another_model_are_refused(shape):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=re.escape(f"{list(shape)} but LlamaForCausalLM has [3, 2, 32]")):
        LeanKCache(LeanKMasks(torch.ones(shape, dtype=torch.bool)), model)


def test_sliding_layer_masks_must_keep_every_channel():
    model = tiny_model("gemma3")
    mask = torch.ones(3, 2, 32, dtype=torch.bool)
    mask[0, :, 16:] = False
    with pytest.raises(ValueError, match="sliding_attention"):
        LeanKCache(LeanKMasks(mask), model)


@pytest.mark.parametrize("override", [{"sink": -1}, {"recent": 1.5}, {"block_size": 0}])
def test_window_overrides_out_of_range(override):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=next(iter(override))):
        LeanKCache(keep_all(model), model, **override)
