"""LeanKCache with `kv_bits`: quantized middle stores (`QuantizedMiddle`, `FixedQuantizedMiddle`).

The oracle of a quantized store is the unquantized one fed the same tokens: whatever the steps (padding, chunks,
flushes, beam reorders, crops), the quantized store must hold exactly what quantizing the unquantized store's middle
at once gives (`QuantizedPrunedKV.quantize`), on the same grid of key blocks. Attention over that is the reference's,
which `test_quantization.py` checks against the float64 definition. Inside `generate`, every feature runs with
`kv_bits` and stays within the quantization's error of the unquantized cache.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.configuration_utils import CompileConfig

from leank_hf import LeanKCache
from leank_hf.cache.layer import LeanKLayer
from leank_hf.cache.static_layer import StaticLeanKLayer
from leank_hf.cache.stores import FixedStore, QuantizedMiddle
from leank_hf.compat import cache_kwargs
from leank_hf.kernels import LeanKAttention, PrunedKV, QuantizedPrunedKV
from leank_hf.kv_quantization import KVQuantization

from .conftest import FAMILIES, tiny_model
from .helpers import drive_layer, keep_all, left_padded_batch, pruned, random_mask, storage_bytes, tensors_held
from .tolerances import assert_close

GREEDY = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": 0}


def front_padded(cache: PrunedKV, pad: int, stored: int | None = None) -> PrunedKV:
    """`cache` with `pad` empty middle slots in front (where a quantized middle starts its first tokens), and only its
    first `stored` middle slots (all: None)."""
    stored = cache.middle_len if stored is None else stored
    keys, values, valid = cache.middle_keys[:, :, :stored], cache.middle_values[:, :, :stored], cache.middle_valid
    if cache.middle_length is not None:  # a fixed store: its flags are refreshed at the next step, from these
        valid = torch.arange(stored, device=valid.device) >= cache.middle_start[:, None]
    return cache._replace(
        middle_keys=torch.cat([keys.new_zeros(*keys.shape[:2], pad, keys.shape[3]), keys], 2),
        middle_values=torch.cat([values.new_zeros(*values.shape[:2], pad, values.shape[3]), values], 2),
        middle_valid=torch.cat([valid.new_zeros(valid.shape[0], pad), valid[:, :stored]], 1),
        middle_start=None if cache.middle_start is None else cache.middle_start + pad,
        middle_length=None,
    )


def assert_holds_quantized(quantized: QuantizedPrunedKV, unquantized: PrunedKV, stored: int | None = None) -> None:
    """`quantized` (a store's view) holds exactly `unquantized`'s middle quantized at once, on its grid; with `stored`,
    only the first `stored` middle slots of the quantized view (the rest of a fixed store's capacity) are compared."""
    pad = (quantized.cache.middle_len if stored is None else stored) - (
        unquantized.middle_len if unquantized.middle_length is None else int(unquantized.middle_length)
    )
    assert 0 <= pad < quantized.block_size
    kept = stored if stored is not None else quantized.cache.middle_len
    expected = QuantizedPrunedKV.quantize(
        front_padded(unquantized, pad, kept - pad), quantized.bits, quantized.block_size, quantized.group_size
    )
    blocks = -(-kept // quantized.block_size)
    got = {
        "key codes": quantized.cache.middle_keys[:, :, :kept],
        "value codes": quantized.cache.middle_values[:, :, :kept],
        "key scales": quantized.key_scales[:, :, :blocks],
        "key zeros": quantized.key_zeros[:, :, :blocks], "value scales": quantized.value_scales[:, :, :kept],
        "value zeros": quantized.value_zeros[:, :, :kept],
    }  # fmt: skip
    want = {
        "key codes": expected.cache.middle_keys, "value codes": expected.cache.middle_values,
        "key scales": expected.key_scales, "key zeros": expected.key_zeros,
        "value scales": expected.value_scales, "value zeros": expected.value_zeros,
    }  # fmt: skip
    for name, tensor in got.items():
        # Slots that hold no real token may hold anything: compare the real ones (and every block's scales).
        if name in ("key codes", "value codes", "value scales", "value zeros"):
            real = expected.cache.middle_valid[:, None, :, None]
            tensor, reference = (torch.where(real, t, torch.zeros_like(t)) for t in (tensor, want[name]))
        else:
            reference = want[name]
        assert torch.equal(tensor, reference), f"{name} differ from the unquantized store's middle quantized at once"
    if stored is None:  # (a fixed store refreshes its flags at the next step, from its middle_start and length)
        assert torch.equal(quantized.cache.middle_valid, expected.cache.middle_valid)
    start = quantized.cache.middle_start
    assert (start is None) == (expected.cache.middle_start is None)
    if start is not None:
        assert torch.equal(start, expected.cache.middle_start)
    for name in ("sink_keys", "sink_values", "sink_lengths", "recent_keys", "recent_values", "recent_valid"):
        assert torch.equal(getattr(quantized.cache, name), getattr(unquantized, name)), name


def twin_layers(mask, bits: int, group: int, **windows) -> tuple[LeanKLayer, LeanKLayer]:
    """An unquantized layer and a quantized one with the same mask and windows."""
    windows = {"sink": 4, "recent": 16, "block_size": 8, **windows}
    return LeanKLayer(mask, **windows), LeanKLayer(mask, **windows, quantization=KVQuantization(bits, group))


STEPS = {
    "prefill-then-decode": ([200] + [1] * 40, [0, 7]),
    "chunks": ([37, 23, 50, 5, 1, 1, 30] + [1] * 12, [0, 29]),  # chunks of any length: blocks leave whole
    "padding-longer-than-the-sink": ([3, 60] + [1] * 20, [9, 0, 2]),
    "short": ([5, 1, 1, 1], [0, 2]),  # never leaves the window
}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("steps", STEPS, ids=list(STEPS))
def test_quantized_store_holds_the_unquantized_middle_quantized_at_once(bits, steps):
    step_lengths, left_pad = STEPS[steps]
    mask = random_mask(4, 64, 16, torch.Generator().manual_seed(bits), prune_head=2)
    plain, quantized = twin_layers(mask, bits, 32)
    drives = (drive_layer(layer, step_lengths, left_pad, 8, 64, torch.float32, torch.Generator().manual_seed(1))
              for layer in (plain, quantized))  # fmt: skip
    for (_, unquantized, _, _), (_, output, _, valid) in zip(*drives, strict=True):
        assert_holds_quantized(quantized.view(), plain.view())
        # The attention is the reference's over that (test_quantization): here, within the quantization's error of
        # the unquantized layer's (padding queries' outputs are not compared).
        real = valid[:, None, :, None].expand_as(output)
        if real.any():
            error = (output - unquantized)[real].norm() / unquantized[real].norm()
            assert error < (0.2 if bits == 4 else 0.02)
    assert quantized.view().cache.middle_len > 0 or steps == "short"
    assert isinstance(quantized.store.flushed.middle, QuantizedMiddle)


@pytest.mark.parametrize("bits", [4, 8])
def test_row_operations_keep_the_quantized_store_the_unquantized_one_quantized(bits):
    """Beam reorders, repeats (num_return_sequences), row selection and crops of window tokens."""
    mask = random_mask(4, 64, 16, torch.Generator().manual_seed(0), prune_head=1)
    plain, quantized = twin_layers(mask, bits, 64)
    for layer in (plain, quantized):
        for _ in drive_layer(layer, [90, 13, 1, 1], [0, 5, 31], 4, 64, torch.float32, torch.Generator().manual_seed(2)):
            pass
    operations = [
        lambda layer: layer.reorder_cache(torch.tensor([2, 0, 0])),
        lambda layer: layer.batch_repeat_interleave(2),
        lambda layer: layer.batch_select_indices(torch.tensor([5, 1, 2, 3])),
        lambda layer: layer.crop(-5),
    ]
    for operation in operations:
        operation(plain)
        operation(quantized)
        assert_holds_quantized(quantized.view(), plain.view())
    assert quantized.store.flushed.middle.keys.shape[0] == 4


@pytest.mark.parametrize("bits", [4, 8])
def test_fixed_quantized_store_quantizes_each_block_as_it_leaves_the_window(bits):
    """A `FixedStore` (max_cache_len) after a one-chunk prefill: decode steps cross several flushes, and the stored
    middle is the unquantized fixed store's, quantized at once, on the grid the prefill started."""
    mask = random_mask(4, 64, 16, torch.Generator().manual_seed(3), prune_head=0)
    windows = {"sink": 4, "recent": 6, "block_size": 8}  # recent < block_size: a block is quantized before it is full
    plain = StaticLeanKLayer(mask, **windows, max_cache_len=160)
    quantized = StaticLeanKLayer(mask, **windows, max_cache_len=160, quantization=KVQuantization(bits, 32))
    drives = (drive_layer(layer, [83] + [1] * 70, [0, 0], 8, 64, torch.float32, torch.Generator().manual_seed(4))
              for layer in (plain, quantized))  # fmt: skip
    for _ in zip(*drives, strict=True):
        assert isinstance(quantized.store, FixedStore)
        view = quantized.view()
        assert_holds_quantized(view, plain.view(), stored=int(view.cache.middle_length))
    assert int(plain.view().middle_length) > 83


def test_a_middle_pruned_to_nothing_stores_nothing():
    mask = torch.zeros(2, 32, dtype=torch.bool)
    layer = LeanKLayer(mask, 4, 8, 4, quantization=KVQuantization(4))
    for _ in drive_layer(layer, [40, 1, 1], [0, 3], 4, 32, torch.float32, torch.Generator().manual_seed(0)):
        pass
    middle = layer.store.flushed.middle
    assert middle.columns == 0 and middle.keys.numel() == middle.values.numel() == 0


def peaked(model):
    """`model` with its output logits scaled up 30 times: the greedy or beam choice between tokens then never hinges
    on the last percent of a logit (these random models' logits are nearly flat), so an int8 middle's error of
    about 1 % cannot flip it, while every step still runs as with any model."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    return model


def quantized_generate(model, masks, inputs, kv_bits, **kwargs):
    cache = LeanKCache(masks, model, kv_bits=kv_bits)
    out = model.generate(**inputs, **cache_kwargs(cache), output_logits=True, return_dict_in_generate=True,
                         **{**GREEDY, **kwargs})  # fmt: skip
    return out.sequences, torch.stack(out.logits), cache


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_with_int8_as_without(family):
    """Greedy tokens of an int8 middle equal the unquantized cache's on these models (their logits stay within 1 %),
    and int4 runs with logits within 20 %."""
    model = tiny_model(family)
    masks = pruned(model)
    inputs = left_padded_batch([40, 23, 9], model.config.vocab_size)
    tokens, logits, _ = quantized_generate(model, masks, inputs, None)
    int8_tokens, int8_logits, cache = quantized_generate(model, masks, inputs, 8)
    assert torch.equal(int8_tokens, tokens)
    assert (int8_logits - logits).norm() / logits.norm() < 0.01
    assert all(layer.view().cache.middle_len for layer in cache.layers if isinstance(layer, LeanKLayer))
    _, int4_logits, _ = quantized_generate(model, masks, inputs, 4, max_new_tokens=4)
    assert (int4_logits - logits[:4]).norm() / logits[:4].norm() < 0.2


FEATURES = {
    "beams": ("llama", {"num_beams": 3, "num_return_sequences": 2}),
    "gemma3-beams": ("gemma3", {"num_beams": 2}),
    "chunked-prefill": ("qwen3", {"prefill_chunk_size": 16}),
    "prompt-lookup": ("llama", {"prompt_lookup_num_tokens": 3}),
}


@pytest.mark.parametrize("feature", FEATURES, ids=list(FEATURES))
def test_generate_features_with_int8_give_the_unquantized_tokens(feature, monkeypatch):
    """On a peaked model, the tokens of the unquantized cache. Beam search with two returned sequences of three beams
    is the exception: its sums of log-probabilities over 24 steps still tie within int8's error on this model, so
    there the first new token (from the exact prefill) and the shapes are compared, and the store's reorders are
    checked exactly by `test_row_operations_keep_the_quantized_store_the_unquantized_one_quantized`."""
    family, kwargs = FEATURES[feature]
    model = peaked(tiny_model(family))
    masks = pruned(model) if feature != "prompt-lookup" else keep_all(model, recent=16)
    inputs = left_padded_batch([45, 33], model.config.vocab_size, seed=2)
    if feature == "prompt-lookup":  # one repetitive row, so that prompt lookup proposes tokens and crops them
        motif = torch.randint(3, 90, (6,), generator=torch.Generator().manual_seed(0))
        ids = torch.cat([motif.repeat(6), motif[:3]]).unsqueeze(0)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calls = []
    for name in ("reorder_cache", "crop"):
        original = getattr(LeanKCache, name)
        monkeypatch.setattr(LeanKCache, name, lambda self, *a, _f=original, _n=name: calls.append(_n) or _f(self, *a))
    tokens, _, _ = quantized_generate(model, masks, inputs, None, **kwargs)
    int8_tokens, _, _ = quantized_generate(model, masks, inputs, 8, **kwargs)
    width = inputs["input_ids"].shape[1]
    assert int8_tokens.shape == tokens.shape
    if feature == "beams":
        assert torch.equal(int8_tokens[:, : width + 1], tokens[:, : width + 1])
    else:
        assert torch.equal(int8_tokens, tokens)
    expected_call = {"beams": "reorder_cache", "gemma3-beams": "reorder_cache", "prompt-lookup": "crop"}.get(feature)
    assert expected_call is None or expected_call in calls


def test_sampling_several_sequences_then_continuing_with_int4():
    """Sampling several sequences per prompt (`batch_repeat_interleave`), then continuing them from the filled cache
    with a follow-up. The unquantized cache replays the same tokens (prompt, repeat, sampled tokens one by one, the
    follow-up): the first layer, whose keys depend on the tokens alone, holds its middle quantized."""
    model = tiny_model("mistral")
    masks = pruned(model)
    inputs = left_padded_batch([30, 20], model.config.vocab_size)
    quantized = LeanKCache(masks, model, kv_bits=4)
    torch.manual_seed(3)
    sampled = model.generate(**inputs, **cache_kwargs(quantized), do_sample=True, num_return_sequences=2,
                             max_new_tokens=6, pad_token_id=0)  # fmt: skip
    follow_up = torch.randint(3, 90, (4, 5), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([sampled, follow_up], dim=1)
    mask = torch.cat([inputs["attention_mask"].repeat_interleave(2, 0),
                      torch.ones(4, ids.shape[1] - inputs["input_ids"].shape[1], dtype=torch.long)], 1)  # fmt: skip
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate counts them
    width, plain = inputs["input_ids"].shape[1], LeanKCache(masks, model)
    with torch.no_grad():
        model(**inputs, position_ids=positions[::2, :width], **cache_kwargs(plain))
        plain.batch_repeat_interleave(2)
        for end in range(width + 1, sampled.shape[1]):
            step = slice(end - 1, end)
            model(input_ids=ids[:, step], attention_mask=mask[:, :end], position_ids=positions[:, step],
                  **cache_kwargs(plain))  # fmt: skip
        for cache in (plain, quantized):  # the last sampled token was never fed: it comes with the follow-up
            rest = slice(sampled.shape[1] - 1, None)
            model(input_ids=ids[:, rest], attention_mask=mask, position_ids=positions[:, rest], **cache_kwargs(cache))
    assert quantized.get_seq_length() == plain.get_seq_length() == ids.shape[1]
    assert_holds_quantized(quantized.layers[0].view(), plain.layers[0].view())


@pytest.mark.parametrize("bits", [4, 8])
def test_compiled_decoding_with_quantized_fixed_stores_decodes_like_the_growing_ones(bits):
    """`max_cache_len` + compile (aot_eager on the CPU, fullgraph: no graph break) with `kv_bits`: the same tokens
    and logits as the eager quantized cache, whose blocks it quantizes identically."""
    model = tiny_model("llama")
    masks = pruned(model)
    inputs = left_padded_batch([30, 17, 26], model.config.vocab_size, seed=4)
    tokens, logits, _ = quantized_generate(model, masks, inputs, bits)
    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True  # generate compiles only on accelerators unless told
    torch._dynamo.reset()
    cache = LeanKCache(masks, model, kv_bits=bits, max_cache_len=64)
    out = model.generate(**inputs, **cache_kwargs(cache), output_logits=True, return_dict_in_generate=True,
                         compile_config=config, **GREEDY)  # fmt: skip
    assert torch.equal(out.sequences, tokens)
    torch.testing.assert_close(torch.stack(out.logits), logits, rtol=1e-4, atol=1e-4)
    assert all(isinstance(layer.store, FixedStore) for layer in cache.layers if isinstance(layer, StaticLeanKLayer))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("max_cache_len", [None, 96])
def test_memory_report_counts_codes_and_scales(bits, max_cache_len):
    model = tiny_model("qwen2")
    inputs = left_padded_batch([30, 17, 26], model.config.vocab_size)
    cache = LeanKCache(pruned(model), model, kv_bits=bits, max_cache_len=max_cache_len)
    model.generate(**inputs, **cache_kwargs(cache), **GREEDY)
    plain = LeanKCache(pruned(model), model, max_cache_len=max_cache_len)
    model.generate(**inputs, **cache_kwargs(plain), **GREEDY)
    for index, layer in enumerate(cache.layers):
        memory, held = layer.memory(index), tensors_held(layer)
        assert memory.key_bytes == storage_bytes(held["keys"])
        assert memory.value_bytes == storage_bytes(held["values"])
        assert memory.other_bytes == storage_bytes(held["other"])
    assert cache.memory_report().total_bytes < plain.memory_report().total_bytes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kv_bits": 3}, "kv_bits=3 is not supported: use 8"),
        ({"kv_bits": True}, "kv_bits=True is not supported"),
        ({"kv_bits": 4, "q_group_size": 48}, "q_group_size must be a power of two"),
        ({"kv_bits": 4, "q_group_size": 64}, "q_group_size=64 does not divide this model's head_dim 32.*use 32"),
    ],
)
def test_bad_quantization_settings_are_refused_with_the_fix(kwargs, match):
    model = tiny_model("llama")  # head_dim 32
    with pytest.raises(ValueError, match=match):
        LeanKCache(pruned(model), model, **kwargs)


def test_default_group_fits_every_head_dim():
    assert KVQuantization(4).group_size(128) == 64
    assert KVQuantization(4).group_size(96) == 32  # Phi-3's head_dim
    assert KVQuantization(4).group_size(32) == 32
    assert KVQuantization(8, 16).group_size(96) == 16


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("max_cache_len", [None, 64], ids=["growable", "fixed"])
def test_quantized_cache_through_the_decode_kernel(monkeypatch, decoder_calls, bits, max_cache_len):
    """fp16 generate with the Triton kernel (the interpreter on the CPU) reading the quantized stores, against the
    PyTorch path over the same stores: same tokens, logits within fp16's tolerance."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama", torch.float16).to(device)
    masks = pruned(model)
    inputs = {k: v.to(device) for k, v in left_padded_batch([30, 17, 26], model.config.vocab_size, seed=5).items()}
    tokens, logits, _ = quantized_generate(model, masks, inputs, bits, max_new_tokens=10)
    assert not decoder_calls or device == "cuda"
    monkeypatch.setattr(LeanKAttention, "kernel_devices", ("cuda", "cpu"))
    cache = LeanKCache(masks, model, kv_bits=bits, max_cache_len=max_cache_len)
    out = model.generate(**inputs, **cache_kwargs(cache), output_logits=True, return_dict_in_generate=True,
                         **{**GREEDY, "max_new_tokens": 10})  # fmt: skip
    assert decoder_calls, "the decode kernel did not run"
    assert_close(torch.stack(out.logits).float(), logits.float(), torch.float16)
    assert torch.equal(out.sequences, tokens)
