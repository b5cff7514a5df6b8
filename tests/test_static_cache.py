"""LeanKCache with `max_cache_len`: fixed-size stores after the prefill, decode steps `torch.compile` captures whole.

Its oracle is the growing `LeanKCache`: both must give the same attention step for step."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import StaticCache
from transformers.generation.configuration_utils import CompileConfig

from leank_hf import LeanKCache
from leank_hf.cache.static_layer import StaticLeanKLayer
from leank_hf.cache.stores import FixedStore
from leank_hf.compat import cache_kwargs
from leank_hf.kernels import LeanKAttention

from .conftest import FAMILIES, tiny_model
from .helpers import keep_all, left_padded_batch, pruned, storage_bytes, tensors_held
from .tolerances import assert_close

# Every row's prompt holds at least sink + recent + block_size = 16 real tokens (WINDOWS).
LENGTHS = [30, 17, 26]
GREEDY = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": 0}


def generate(model, cache, inputs, **kwargs):
    out = model.generate(**inputs, **cache_kwargs(cache), output_logits=True, return_dict_in_generate=True,
                         **{**GREEDY, **kwargs})  # fmt: skip
    return out.sequences, torch.stack(out.logits)


def static_cache(model, masks, **kwargs) -> LeanKCache:
    return LeanKCache(masks, model, max_cache_len=64, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_stores_decode_exactly_like_growing_ones(family):
    """24 new tokens cross six window flushes (block 4); left padding; Gemma3's sliding layers are transformers'
    static ones here, its dynamic ones in the growing cache (window 12: the prompts outgrow it)."""
    model = tiny_model(family)
    masks = pruned(model)
    inputs = left_padded_batch(LENGTHS, model.config.vocab_size, seed=4)
    tokens, logits = generate(model, LeanKCache(masks, model), inputs)
    cache = static_cache(model, masks)
    static_tokens, static_logits = generate(model, cache, inputs)
    assert torch.equal(static_tokens, tokens)
    assert_close(static_logits, logits, torch.float32)
    layers = [layer for layer in cache.layers if isinstance(layer, StaticLeanKLayer)]
    assert layers and all(isinstance(layer.store, FixedStore) for layer in layers)
    assert all(int(layer.get_seq_length()) == tokens.shape[1] - 1 for layer in layers)  # the last token is not fed


def test_fixed_stores_through_the_decode_kernel(monkeypatch):
    """The same on the Triton kernel (the interpreter on the CPU), which reads the middle length on the device."""
    pytest.importorskip("triton")
    monkeypatch.setattr(LeanKAttention, "kernel_devices", ("cuda", "cpu"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama", torch.float16).to(device)
    masks = pruned(model)
    inputs = {k: v.to(device) for k, v in left_padded_batch(LENGTHS, model.config.vocab_size, seed=5).items()}
    tokens, logits = generate(model, LeanKCache(masks, model), inputs, max_new_tokens=12)
    static_tokens, static_logits = generate(model, static_cache(model, masks), inputs, max_new_tokens=12)
    assert_close(static_logits.float(), logits.float(), torch.float16)
    assert torch.equal(static_tokens, tokens)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compiled_decoding_compiles_as_often_as_a_static_cache(family):
    """`generate` compiles the decode step (max_cache_len makes the cache compileable) with no graph break, as often
    as for transformers' `StaticCache` (on transformers 5.17-5.23: once for Llama; for Gemma3 once more, as dynamo
    makes the length its static sliding layers keep in a Python int dynamic), and a second cache compiles nothing
    new."""
    model = tiny_model(family)
    masks = pruned(model)
    inputs = left_padded_batch(LENGTHS, model.config.vocab_size, seed=6)
    expected, _ = generate(model, static_cache(model, masks), inputs)
    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True  # generate compiles only on accelerators unless told

    def graphs_after_each_call(make_cache) -> list[int]:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # earlier tests may have compiled
        graphs = []
        for _ in range(2):
            cache = make_cache()
            assert cache.is_compileable
            tokens, _ = generate(model, cache, inputs, compile_config=config)
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            if isinstance(cache, LeanKCache):
                assert torch.equal(tokens, expected)
        return graphs

    leank = graphs_after_each_call(lambda: static_cache(model, masks))
    stock = graphs_after_each_call(lambda: StaticCache(config=model.config, max_cache_len=64))
    assert leank == stock == [leank[0]] * 2
    assert leank[0] >= 1, "generate did not compile"


def test_beam_search_reorders_the_fixed_stores_in_place():
    model = tiny_model("llama")
    masks = pruned(model)
    inputs = left_padded_batch(LENGTHS[:2], model.config.vocab_size, seed=7)
    beams = {"num_beams": 3, "num_return_sequences": 2}
    expected, _ = generate(model, LeanKCache(masks, model), inputs, **beams)
    cache = static_cache(model, masks)
    tokens, _ = generate(model, cache, inputs, **beams)
    assert torch.equal(tokens, expected)


def test_memory_report_of_fixed_stores():
    model = tiny_model("qwen2")
    inputs = left_padded_batch(LENGTHS, model.config.vocab_size)
    stock, cache = StaticCache(config=model.config, max_cache_len=64), static_cache(model, pruned(model))
    model.generate(**inputs, **cache_kwargs(stock), **GREEDY)
    model.generate(**inputs, **cache_kwargs(cache), **GREEDY)
    report = cache.memory_report()
    assert report.baseline == "StaticCache"
    assert report.dense_bytes == sum(layer.keys.nbytes + layer.values.nbytes for layer in stock.layers)
    fed = inputs["input_ids"].shape[1] + GREEDY["max_new_tokens"] - 1  # the last new token is not fed
    for index, layer in enumerate(cache.layers):
        assert isinstance(layer, StaticLeanKLayer)
        memory, held = layer.memory(index), tensors_held(layer)
        assert memory.key_bytes == storage_bytes(held["keys"])
        assert memory.value_bytes == storage_bytes(held["values"])
        assert memory.other_bytes == storage_bytes(held["other"])
        # Reserved: the middle slots (kept key channels, values of heads keeping one, a flag) of positions not reached.
        mask = layer.channel_mask
        slot = 4 * (int(mask.sum()) + int(mask.any(-1).sum()) * mask.shape[1]) + 1
        assert memory.reserved_bytes == len(LENGTHS) * (64 - fed) * slot


@pytest.mark.parametrize(
    ("lengths", "kwargs", "match"),
    [
        ([30, 10], {}, "= 16 real tokens always give; some row's prompt is too short"),
        ([64], {}, "leaves no room in max_cache_len=64"),
        ([40, 40], {"prefill_chunk_size": 16}, "one token per step"),
        # transformers >= 5.24 refuses a cache that is not croppable; earlier ones reach the two-token draft step
        ([40], {"prompt_lookup_num_tokens": 3}, "can be cropped|one token per step"),
    ],
    ids=["prompt-shorter-than-the-windows", "prompt-fills-the-cache", "chunked-prefill", "assisted-decoding"],
)
def test_what_fixed_stores_cannot_do_is_refused(lengths, kwargs, match):
    model = tiny_model("llama")
    inputs = left_padded_batch(lengths, model.config.vocab_size)
    with pytest.raises(ValueError, match=match):
        model.generate(**inputs, **cache_kwargs(static_cache(model, pruned(model))), **{**GREEDY, **kwargs})


def test_no_rollback_once_filled():
    model = tiny_model("llama")
    cache = static_cache(model, pruned(model))
    model.generate(**left_padded_batch([30], model.config.vocab_size), **cache_kwargs(cache), **GREEDY)
    assert not cache.is_croppable, "transformers must be told before it tries (assisted decoding)"
    with pytest.raises(ValueError, match="cannot roll tokens back"):
        cache.crop(-2)


@pytest.mark.parametrize("max_cache_len", [0, -3, 40.0, True], ids=["zero", "negative", "float", "bool"])
def test_bad_max_cache_len(max_cache_len):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        LeanKCache(pruned(model), model, max_cache_len=max_cache_len)


@pytest.mark.parametrize("masks", [pruned, keep_all], ids=["fixed-leank-stores", "kept-full-like-a-static-cache"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_too_small_max_cache_len_is_named_at_the_step_that_would_overflow(masks, family, compiled):
    """Compiled decode steps run no Python in `update`; the step that would overflow is still refused before it runs
    (Gemma3: transformers asks mask sizes twice per step, once per mask kind, and each step counts once)."""
    model = tiny_model(family)
    inputs = left_padded_batch([30, 20], model.config.vocab_size)
    settings = {**GREEDY, "max_new_tokens": 20}
    if compiled:
        config = CompileConfig(backend="aot_eager", fullgraph=True)
        config._compile_all_devices = True  # generate compiles only on accelerators unless told
        settings["compile_config"] = config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keep-all masks keep full keys at any length, and say so
        cache = LeanKCache(masks(model), model, max_cache_len=40)
        short_cache = LeanKCache(masks(model), model, max_cache_len=29)
        fitting_cache = LeanKCache(masks(model), model, max_cache_len=50)
    message = r"max_cache_len=40 is full: the rows hold 40 tokens \(a prompt of 30 and 10 new ones\) and this step"
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, **cache_kwargs(cache), **settings)
    with pytest.raises(ValueError, match="the prompt \\(30 tokens per row, padding included\\) does not fit"):
        model.generate(**inputs, **cache_kwargs(short_cache), **settings)
    out = model.generate(**inputs, **cache_kwargs(fitting_cache), **settings)  # exactly full: no step refused
    assert out.shape[1] == 50


def test_without_max_cache_len_generate_does_not_compile():
    model = tiny_model("llama")
    assert not LeanKCache(pruned(model), model).is_compileable
    assert static_cache(model, pruned(model)).is_compileable


@pytest.mark.skipif(not torch.cuda.is_available(), reason="generate compiles with CUDA graphs only on a GPU")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_compiles_decoding_into_cuda_graphs_on_the_gpu(family):
    """What users run: generate's own compiled decoding (inductor, mode reduce-overhead) over the Triton kernel."""
    model = tiny_model(family, torch.float16).cuda()
    masks = pruned(model)
    inputs = {k: v.cuda() for k, v in left_padded_batch(LENGTHS, model.config.vocab_size, seed=8).items()}
    tokens, logits = generate(model, LeanKCache(masks, model), inputs)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(2):  # the second call replays the graphs the first recorded
        compiled_tokens, compiled_logits = generate(model, static_cache(model, masks), inputs)
        assert_close(compiled_logits.float(), logits.float(), torch.float16)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "generate did not compile"
    assert torch.equal(compiled_tokens, tokens)


def test_layout_registry_is_freed_with_its_caches_and_bounded():
    """1000 caches with `max_cache_len` and a different mask each: the device layouts go with their caches, and the
    map from mask content to the compiled operator's int stays bounded. Equal masks keep their int (no recompile)."""
    import gc

    from leank_hf.kernels import compiled

    model = tiny_model("llama")
    inputs = left_padded_batch([20], model.config.vocab_size)
    first = static_cache(model, pruned(model, seed=0))
    model.generate(**inputs, **cache_kwargs(first), **{**GREEDY, "max_new_tokens": 2})
    first_indices = [layer._registered.index for layer in first.layers]
    for seed in range(1, 21):  # through generate, layers registering as they fill
        model.generate(**inputs, **cache_kwargs(static_cache(model, pruned(model, seed))), **{**GREEDY,
                       "max_new_tokens": 2})  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for _ in range(1000):  # what many caches' layers register
        compiled.register_layout(torch.rand(2, 32, generator=generator) < 0.5, torch.device("cpu"))
    gc.collect()
    alive = {layer._registered.index for layer in first.layers}
    assert set(compiled._REGISTERED) == alive
    assert len(compiled._INDICES) <= compiled._REMEMBERED_MASKS
    again = static_cache(model, pruned(model, seed=0))
    del first
    gc.collect()
    model.generate(**inputs, **cache_kwargs(again), **{**GREEDY, "max_new_tokens": 2})
    assert [layer._registered.index for layer in again.layers] == first_indices
