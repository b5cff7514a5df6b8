"""A LeanK cache never holds more keys and values than the stock cache it replaces plus one flush block, at any
length; its bookkeeping (padding flags, sink lengths) costs a byte or two per token and row."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache, StaticCache, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import StaticLayer

from leank_hf import LeanKCache
from leank_hf.compat import cache_kwargs

from .conftest import tiny_llama, tiny_model
from .helpers import WINDOWS, keep_all, left_padded_batch, pruned


class BytesPerStep(StoppingCriteria):
    """Records the bytes a cache holds after every generate step (and never stops generation)."""

    def __init__(self, cache, held) -> None:
        self.cache, self.held, self.steps = cache, held, []

    def __call__(self, input_ids, scores, **kwargs):
        self.steps.append(self.held(self.cache))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def stock_bytes(cache: DynamicCache | StaticCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def leank_bytes(cache: LeanKCache) -> tuple[int, int]:
    """(key and value bytes, bookkeeping bytes) held, as `memory_report` counts them (test_cache_layer checks that
    it counts the tensors held)."""
    report = cache.memory_report()
    return report.key_bytes + report.value_bytes, report.other_bytes


def block_bytes(model, batch: int) -> int:
    """One flush block of full-width keys and values in every layer: the slack a LeanK cache may hold."""
    config = model.config
    return 2 * batch * config.num_key_value_heads * WINDOWS["block_size"] * 32 * 4 * config.num_hidden_layers


@pytest.mark.parametrize("masks", [keep_all, pruned], ids=["keep-all", "pruned"])
@pytest.mark.parametrize("lengths", [[1], [3, 1], [9], [14, 6], [40, 25]], ids=lambda n: f"prompt{n}")
def test_eager_cache_never_holds_more_than_dynamic_cache_plus_a_block(masks, lengths):
    model = tiny_model("llama")
    inputs = left_padded_batch(lengths, model.config.vocab_size)
    per_step = {}
    for name, cache, held in (
        ("dynamic", DynamicCache(config=model.config), stock_bytes),
        ("leank", LeanKCache(masks(model), model), leank_bytes),
    ):
        recorder = BytesPerStep(cache, held)
        model.generate(
            **inputs, **cache_kwargs(cache), max_new_tokens=40, do_sample=False, pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([recorder]),
        )  # fmt: skip
        per_step[name] = recorder.steps
    slack = block_bytes(model, len(lengths))
    layers, rows = model.config.num_hidden_layers, len(lengths)
    for step, (dense, (leank, bookkeeping)) in enumerate(zip(per_step["dynamic"], per_step["leank"], strict=True)):
        tokens = inputs["input_ids"].shape[1] + step + 1
        assert leank <= dense + slack, f"step {step}: {leank - dense - slack} bytes over DynamicCache + one block"
        # A flag per token in the middle and per window slot (at most `tokens + block` of each), and two longs per row.
        assert bookkeeping <= layers * rows * (2 * (tokens + WINDOWS["block_size"]) + 16), f"step {step}"


@pytest.mark.parametrize("masks", [keep_all, pruned], ids=["keep-all", "pruned"])
@pytest.mark.parametrize("max_cache_len", [24, 40, 64, 200])
def test_fixed_size_cache_never_holds_more_than_a_static_cache(masks, max_cache_len):
    """With `max_cache_len` the stock cache is a `StaticCache` of that length. Where fixed-size LeanK stores cannot
    beat it (their sink and window ring stay at full width), the cache says so and keeps full keys like it."""
    model = tiny_model("llama")
    inputs = left_padded_batch([20, 17], model.config.vocab_size)  # sink + recent + block_size = 16 real tokens
    generate = {"max_new_tokens": max_cache_len - 20, "do_sample": False, "pad_token_id": 0}
    stock = StaticCache(config=model.config, max_cache_len=max_cache_len)
    model.generate(**inputs, **cache_kwargs(stock), **generate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = LeanKCache(masks(model), model, max_cache_len=max_cache_len)
    kept_full = all(isinstance(layer, StaticLayer) for layer in cache.layers)
    assert kept_full == any("too short for these LeanK masks to save memory" in str(w.message) for w in caught)
    assert kept_full == (masks is keep_all or max_cache_len == 24)  # pruned masks here keep 3/8 to 1/2 per token
    recorder = BytesPerStep(cache, leank_bytes)
    model.generate(**inputs, **cache_kwargs(cache), **generate, stopping_criteria=StoppingCriteriaList([recorder]))
    slack = block_bytes(model, 2)
    for step, (held, _) in enumerate(recorder.steps):
        assert held <= stock_bytes(stock) + slack, f"step {step}: {held - stock_bytes(stock) - slack} bytes over"


def test_windows_longer_than_the_model_reads_are_refused():
    model = tiny_model("llama")  # max_position_embeddings 512
    masks = keep_all(model)
    for windows in ({"sink": 10**6}, {"block_size": 100_000}, {"sink": 200, "recent": 200, "block_size": 200}):
        with pytest.raises(ValueError, match=r"exceeds the 512 positions .* \(max_position_embeddings\)"):
            LeanKCache(masks, model, **windows)


def test_long_windows_allocate_what_is_held_not_what_is_allowed():
    """A mask repo's large windows cost nothing until tokens fill them: a 34-token run holds about its 34 tokens."""
    model = tiny_llama(vocab_size=96)  # max_position_embeddings 4096
    masks = keep_all(model, sink=600, recent=300, block_size=3000)
    inputs = left_padded_batch([30], model.config.vocab_size)
    cache, dense = LeanKCache(masks, model), DynamicCache(config=model.config)
    for each in (cache, dense):
        model.generate(**inputs, **cache_kwargs(each), max_new_tokens=4, do_sample=False, pad_token_id=0)
    granule = 2 * model.config.num_key_value_heads * 64 * 32 * 4 * model.config.num_hidden_layers  # 64 tokens
    assert leank_bytes(cache)[0] <= stock_bytes(dense) + granule


@pytest.mark.parametrize("lengths", [[1], [30], [100, 60], [280]], ids=lambda n: f"prompt{n}")
def test_rows_shorter_than_the_windows_hold_what_a_dynamic_cache_holds(lengths):
    """With the shipped windows (64 + 256 + 64) a short row is all window: it may reserve a sixteenth for the next
    tokens, not a block (a 38-token row held 1.49x a DynamicCache's bytes with 64-token steps)."""
    model = tiny_model("llama")
    masks = pruned(model).replace(sink=64, recent=256, block_size=64)
    inputs = left_padded_batch(lengths, model.config.vocab_size)
    per_step = {}
    for name, cache, held in (
        ("dynamic", DynamicCache(config=model.config), stock_bytes),
        ("leank", LeanKCache(masks, model), leank_bytes),
    ):
        recorder = BytesPerStep(cache, held)
        model.generate(
            **inputs, **cache_kwargs(cache), max_new_tokens=70, do_sample=False, pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([recorder]),
        )  # fmt: skip
        per_step[name] = recorder.steps
    token = block_bytes(model, len(lengths)) // WINDOWS["block_size"]  # one full-width token in every layer
    for step, (dense, (leank, _)) in enumerate(zip(per_step["dynamic"], per_step["leank"], strict=True)):
        if inputs["input_ids"].shape[1] + step + 1 >= 256 + 64:
            break  # tokens start leaving the window: one block of slack (the test above) until pruning pays
        assert leank <= dense + max(token, dense // 16), f"step {step}: {leank / dense:.3f}x the DynamicCache"
