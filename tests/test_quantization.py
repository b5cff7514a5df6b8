"""Low-bit middle stores (`leank_hf.kernels.quantization`): the round trip within the bound its arithmetic promises,
the int4 byte layout, padding and degenerate groups, and the reference attention over a quantized middle against the
float64 definition and against the unquantized cache."""

from __future__ import annotations

import math

import pytest
import torch

from leank_hf.kernels import ChannelLayout, PrunedKV, QuantizedPrunedKV, leank_attention_reference
from leank_hf.kernels import reference as reference_module
from leank_hf.kernels.quantization import (
    dequantize_keys,
    dequantize_values,
    pack_int4,
    quantize_keys,
    quantize_values,
    unpack_int4,
)

from .dense_reference import dense_leank_attention
from .helpers import random_cache, random_mask, reference
from .tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def outlier_data(*shape: int, seed: int) -> torch.Tensor:
    """fp32 `[..., n]` normal data whose last axis has a few channels of large magnitude and offset, as post-RoPE keys
    have: the case where fp16 rounding of a zero near the offset matters."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    channels = shape[-1]
    x[..., : max(1, channels // 8)] *= 20.0
    x[..., channels // 2 :: 7] += 300.0
    return x


def half_step(low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """Half the grid step of a group spanning `[low, high]`, from min and max alone: `(high - low) / (2**bits - 1)`,
    widened by what storing the grid in fp16 may add (the zero rounded down by less than one fp16 ulp of `low`,
    2**-10 |low| or 2**-24 below the normal range; the step rounded up by less than one ulp of itself), plus fp32's
    rounding of `x - zero`, the division and `zero + code * scale` (a few 2**-24 |x|)."""
    low, high = low.double(), high.double()
    zero_slack = low.abs() * 2**-10 + 2**-24
    step = (high - low + zero_slack) / (2**bits - 1) * (1 + 2**-10) + 2**-24
    return step / 2 + 2**-21 * torch.maximum(low.abs(), high.abs())


def assert_within(error: torch.Tensor, bound: torch.Tensor, valid: torch.Tensor) -> None:
    """Every valid element's error within its bound; print the worst one if not."""
    excess = torch.where(valid, error - bound, -torch.inf)
    worst = int(excess.flatten().argmax())
    assert excess.flatten()[worst] <= 0, (
        f"element #{worst}: error {error.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e}"
    )


# ------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("tokens", [1, 63, 65, 127])
@pytest.mark.parametrize("channels", [13, 40])
def test_keys_round_trip_within_half_a_step(bits, dtype, block_size, tokens, channels):
    keys = outlier_data(2, 3, tokens, channels, seed=tokens * channels).to(dtype)
    valid = torch.ones(2, 1, tokens, dtype=torch.bool)
    valid[1, :, : tokens // 3] = False  # a left-padded row: its padding holds garbage
    keys[1, :, 0 : tokens // 3 : 2], keys[1, :, 1 : tokens // 3 : 2] = float("nan"), 1e4

    quantized = quantize_keys(keys, bits, block_size, valid)
    assert quantized.data.dtype == torch.uint8
    assert quantized.data.shape == (2, 3, tokens, channels if bits == 8 else (channels + 1) // 2)
    assert quantized.scales.shape == quantized.zeros.shape == (2, 3, -(-tokens // block_size), channels)
    assert quantized.scales.dtype == quantized.zeros.dtype == torch.float16
    error = (dequantize_keys(quantized).double() - keys.double()).abs()

    # The bound, from each block's min and max over its valid tokens, a block at a time.
    bound = torch.zeros_like(error)
    flags = valid.expand(2, 3, tokens)
    for start in range(0, tokens, block_size):
        block, ok = keys[:, :, start : start + block_size].double(), flags[:, :, start : start + block_size, None]
        low = block.masked_fill(~ok, math.inf).amin(2, keepdim=True)
        high = block.masked_fill(~ok, -math.inf).amax(2, keepdim=True)
        bound[:, :, start : start + block_size] = half_step(low, high, bits).expand_as(block)
        # The stored step itself is no wider than the bound's (a too-wide grid could pass by luck).
        stored = quantized.scales[:, :, start // block_size, None].double() / 2
        assert_within(stored, half_step(low, high, bits), ok.any(2, keepdim=True))
    assert_within(error, bound, flags[..., None])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dim", "group_size"), [(40, 8), (40, 20), (40, 40), (64, 32), (13, 13)])
def test_values_round_trip_within_half_a_step(bits, dtype, dim, group_size):
    tokens = 37
    values = outlier_data(2, 3, tokens, dim, seed=dim + group_size).to(dtype)
    valid = torch.ones(2, 1, tokens, dtype=torch.bool)
    valid[0, :, :5] = False
    values[0, :, :5] = float("nan")

    quantized = quantize_values(values, bits, group_size, valid)
    assert quantized.data.shape == (2, 3, tokens, dim if bits == 8 else (dim + 1) // 2)
    assert quantized.scales.shape == (2, 3, tokens, dim // group_size)
    error = (dequantize_values(quantized).double() - values.double()).abs()

    groups = values.double().unflatten(-1, (dim // group_size, group_size))
    bound = half_step(groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True), bits).expand_as(groups)
    assert_within(error, bound.flatten(-2), valid.expand(2, 3, tokens)[..., None])
    assert not dequantize_values(quantized).isnan().any(), "padding tokens must dequantize to numbers"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_data_on_the_grid_round_trips_exactly(bits, dtype):
    """Elements `zero + code * step` with every code of a group between 0 and the top one, an fp16 zero and a power
    of two step (so that every value is exact in the dtype) come back bit for bit."""
    levels = 2**bits - 1
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, levels + 1, (2, 3, 64, 16), generator=generator)
    codes[..., 0, :], codes[..., 1, :] = 0, levels  # each key block (one block: 64 tokens) spans the grid
    codes[..., 0], codes[..., 1] = 0, levels  # each value group (one group: 16 channels) too
    step = 2.0 ** torch.randint(-6, -2, (3, 1, 16), generator=generator)
    zero = -(levels // 2) * step  # |x| <= 128 steps: exact in bf16's 8 bits
    x = (zero + codes * step).to(dtype)
    assert torch.equal(dequantize_keys(quantize_keys(x, bits, 64)), x.float())
    assert torch.equal(dequantize_values(quantize_values(x.transpose(-1, -2), bits, 64)), x.transpose(-1, -2).float())


# ------------------------------------------------------------------------------------------------------ packing
def test_int4_packs_halves_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [15, 0, 9, 0, 1, 2, 3]], dtype=torch.uint8)
    packed = pack_int4(codes)
    # Byte j: code j low, code j + 4 high (the last byte's high nibble is empty: 7 codes).
    assert packed.tolist() == [[1 | 5 << 4, 2 | 6 << 4, 3 | 7 << 4, 4], [15 | 1 << 4, 0 | 2 << 4, 9 | 3 << 4, 0]]
    assert torch.equal(unpack_int4(packed, 7), codes)


@pytest.mark.parametrize("count", [1, 2, 13, 16, 40, 127])
def test_int4_packing_round_trips_every_code(count):
    codes = torch.randint(0, 16, (3, 5, count), generator=torch.Generator().manual_seed(count), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, (count + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, count), codes)


# ------------------------------------------------------------------------------------- padding, degenerate groups
@pytest.mark.parametrize("bits", [4, 8])
def test_padding_never_changes_what_real_tokens_store(bits):
    """Whatever a padding slot holds (NaN, huge values), the real tokens' codes, scales and zeros are those of the
    same tokens without it, and a block or token with no real element gets a zero grid."""
    keys = torch.randn(3, 2, 70, 16, generator=torch.Generator().manual_seed(1))
    valid = torch.arange(70) >= torch.tensor([0, 20, 66])[:, None]  # row 2's first block is all padding
    results = []
    for garbage in (float("nan"), 1e4, -1e4, 0.0):
        filled = keys.masked_fill(~valid[:, None, :, None], garbage)
        results.append(
            (quantize_keys(filled, bits, 64, valid[:, None]), quantize_values(filled, bits, 8, valid[:, None]))
        )
    for quantized_keys, quantized_values in results[1:]:
        for got, first in ((quantized_keys, results[0][0]), (quantized_values, results[0][1])):
            assert all(torch.equal(a, b) for a, b in zip(got[:3], first[:3], strict=True))
    quantized_keys, quantized_values = results[0]
    assert not quantized_keys.scales.isnan().any() and not quantized_values.scales.isnan().any()
    assert (quantized_keys.scales[2, :, 0] == 0).all() and (quantized_keys.zeros[2, :, 0] == 0).all()
    assert (quantized_values.scales[2, :, :66] == 0).all() and (
        dequantize_values(quantized_values)[2, :, :66] == 0
    ).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_and_zero_groups_need_no_division(bits, dtype):
    zeros = torch.zeros(1, 2, 65, 16, dtype=dtype)
    for quantized, dequantize in ((quantize_keys(zeros, bits, 64), dequantize_keys),
                                  (quantize_values(zeros, bits, 8), dequantize_values)):  # fmt: skip
        assert (quantized.scales == 0).all() and torch.equal(dequantize(quantized), zeros.float())
    constant = torch.full((1, 2, 65, 16), 3.25, dtype=dtype)  # exact in fp16: step 0, exact round trip
    assert torch.equal(dequantize_keys(quantize_keys(constant, bits, 64)), constant.float())
    assert torch.equal(dequantize_values(quantize_values(constant, bits, 8)), constant.float())
    if dtype == torch.float32:  # not exact in fp16: a tiny step above an fp16 zero, within half of it
        inexact = torch.full((1, 2, 65, 16), 0.1)
        error = (dequantize_keys(quantize_keys(inexact, bits, 64)) - inexact).abs()
        assert_within(error, half_step(inexact, inexact, bits), torch.ones_like(error, dtype=torch.bool))


def test_values_beyond_fp16_range_saturate_without_nan():
    x = torch.tensor([[1e6, -1e6, 0.0, 1.0]])
    for quantized in (quantize_keys(x[None], 8, 64), quantize_values(x, 8, 4)):
        assert quantized.scales.isfinite().all() and quantized.zeros.isfinite().all()
    assert dequantize_values(quantize_values(x, 8, 4)).isfinite().all()


def test_bad_settings_are_refused_with_the_fix():
    x = torch.randn(1, 1, 8, 40)
    for bits in (2, 3, 16):
        with pytest.raises(ValueError, match=r"use 8 \(1 byte per element\) or 4"):
            quantize_keys(x, bits, 64)
    with pytest.raises(ValueError, match=r"must divide the values' head_dim 40: pick a divisor of 40, e\.g\. 8"):
        quantize_values(x, 4, 16)
    with pytest.raises(ValueError, match="block_size must be at least 1"):
        quantize_keys(x, 4, 0)


# ------------------------------------------------------------------------------------------ attention, the oracle
def pruned_from_dense(
    keys: torch.Tensor, values: torch.Tensor, pad: list[int], sink: int, window: int, mask: torch.Tensor
) -> PrunedKV:
    """What a layer holds for full keys and values `[B, H, T, D]` of left-padded rows (`pad[b]` padding tokens first):
    each row's first `sink` real tokens, the last `window` tokens (all real) and, between them, middle slot `c` for
    token `sink + c`, real from slot `pad[b]` on."""
    tokens = keys.shape[2]
    layout = ChannelLayout.from_mask(mask)
    middle = slice(sink, tokens - window)
    starts = torch.tensor(pad)
    return PrunedKV(
        sink_keys=torch.stack([keys[b, :, p : p + sink] for b, p in enumerate(pad)]),
        sink_values=torch.stack([values[b, :, p : p + sink] for b, p in enumerate(pad)]),
        sink_lengths=torch.full((len(pad),), sink),
        middle_keys=layout.pruned_keys(keys[:, :, middle]),
        middle_values=values[:, layout.value_heads, middle],
        middle_valid=torch.arange(tokens - window - sink) >= starts[:, None],
        middle_start=starts,
        recent_keys=keys[:, :, -window:],
        recent_values=values[:, :, -window:],
        recent_valid=torch.ones(len(pad), window, dtype=torch.bool),
        layout=layout,
    )


def with_middle(keys, values, sink, cache: PrunedKV):
    """Full keys and values whose real middle tokens have `cache`'s kept key channels and value rows instead."""
    layout, batch, middle = cache.layout, keys.shape[0], cache.middle_len
    keys, values = keys.clone(), values.clone()
    real = cache.middle_valid  # [B, M]; the other slots are padding or sink tokens
    kept = cache.middle_keys.permute(1, 3, 0, 2).reshape(-1, batch, middle)  # [C, B, M], store order
    key_slots = keys[:, :, sink : sink + middle]
    key_slots[:, layout.lane_heads, :, layout.lane_channels] = torch.where(
        real, kept, key_slots[:, layout.lane_heads, :, layout.lane_channels]
    )
    value_slots = values[:, layout.value_heads, sink : sink + middle]
    values[:, layout.value_heads, sink : sink + middle] = torch.where(real[:, None, :, None], cache.middle_values,
                                                                      value_slots)  # fmt: skip
    return keys, values


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("group", "steps"), [(1, 1), (4, 1), (4, 5)])
def test_quantized_reference_matches_the_float64_definition(bits, group, steps):
    """Left padding (one row's middle starts 37 slots later), a fully pruned head, GQA, 150 middle tokens (a partial
    last block of 64), and multi-token steps: the reference over the quantized middle is LeanK attention, by its
    float64 definition, over keys and values whose middle is what the quantized store gives back."""
    heads, head_dim, sink, window, pad = 3, 64, 5, 24, [0, 37]
    tokens = sink + max(pad) + 150 + window
    generator = torch.Generator().manual_seed(bits * 10 + group + steps)
    keys, values = (outlier_data(2, heads, tokens, head_dim, seed=seed) for seed in (group, steps))
    queries = torch.randn(2, heads * group, steps, head_dim, generator=generator)
    mask = random_mask(heads, head_dim, 16, generator, prune_head=1)
    valid = torch.arange(tokens) >= torch.tensor(pad)[:, None]
    cache = pruned_from_dense(keys, values, pad, sink, window, mask)
    scaling = head_dim**-0.5

    def definition(keys, values):
        return dense_leank_attention(
            queries, keys, values, valid, tokens - steps, window - steps, mask, sink, scaling
        ).float()

    assert_close(leank_attention_reference(queries, cache, scaling), definition(keys, values), torch.float32)
    quantized = QuantizedPrunedKV.quantize(cache, bits, 64, 32)
    expected = definition(*with_middle(keys, values, sink, quantized.dequantized()))
    assert_close(leank_attention_reference(queries, quantized, scaling), expected, torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("batch", "q_heads", "heads", "middle", "steps"),
    [(1, 4, 2, 63, 1), (3, 8, 2, 130, 1), (2, 3, 3, 65, 4), (2, 4, 1, 0, 1)],
)
def test_quantized_reference_is_the_reference_on_the_dequantized_middle(bits, batch, q_heads, heads, middle, steps):
    """Ragged sinks, ragged middle starts and holes in the window (`random_cache`): the same numbers as the unquantized
    reference run on the dequantized cache, to fp32 rounding."""
    cache = random_cache(batch, heads, 64, 16, 4, middle, 9, torch.float32, seed=middle + bits, prune_head=0)
    query = torch.randn(batch, q_heads, steps, 64, generator=torch.Generator().manual_seed(middle))
    quantized = QuantizedPrunedKV.quantize(cache, bits, 16, 32)
    out = leank_attention_reference(query, quantized, 0.125)
    torch.testing.assert_close(out, reference(query, quantized.dequantized(), 0.125), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_reference_in_bf16_attends_its_middle_in_fp32(bits):
    cache = random_cache(2, 2, 64, 16, 4, 100, 9, torch.bfloat16, seed=bits)
    query = torch.randn(2, 8, 1, 64, generator=torch.Generator().manual_seed(bits)).bfloat16()
    quantized = QuantizedPrunedKV.quantize(cache, bits, 64, 32)
    out = leank_attention_reference(query, quantized, 0.125)
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(query, quantized.dequantized(), 0.125), torch.bfloat16)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_attention_stays_close_to_the_unquantized(bits):
    """Attention over the middle alone (sink and window emptied, so nothing dilutes the middle's error) of N(0, 1)
    keys and values. Rounding to a grid of step s adds noise of RMS s / sqrt(12); a block of 64 normal keys spans
    about 5 sigma (a group of 32 values a little less), so s ~ 5 / (2**bits - 1). With scaling * |q| ~ 1 the score
    noise is that of the keys, and the output's relative error is about the keys' and the values' noise added in
    quadrature: sqrt(2) * 5 / ((2**bits - 1) sqrt(12)), 0.136 at 4 bits and 0.008 at 8 bits. The error must be within
    1.5x of it, and above a third of it (the middle really was quantized)."""
    expected = math.sqrt(2) * 5 / ((2**bits - 1) * math.sqrt(12))
    for seed in range(3):
        cache = random_cache(2, 4, 64, 16, 4, 512, 9, torch.float32, seed=seed)
        cache = cache._replace(sink_lengths=torch.zeros_like(cache.sink_lengths),
                               recent_valid=torch.zeros_like(cache.recent_valid))  # fmt: skip
        query = torch.randn(2, 16, 1, 64, generator=torch.Generator().manual_seed(seed))
        exact = reference(query, cache, 0.125)
        quantized = leank_attention_reference(query, QuantizedPrunedKV.quantize(cache, bits, 64, 32), 0.125)
        error = float((quantized - exact).norm() / exact.norm())
        assert expected / 3 < error < 1.5 * expected, (
            f"seed {seed}: relative error {error:.4f}, expected ~{expected:.4f}"
        )


def test_quantizing_a_cache_ignores_what_its_padding_slots_hold():
    """Rows whose middle starts later (`random_cache`'s ragged starts): huge values in their padding slots change
    neither a scale nor the attention."""
    cache = random_cache(3, 2, 64, 16, 4, 130, 9, torch.float32, seed=5)
    assert (cache.middle_start > 0).any()
    padding = ~cache.middle_valid
    poisoned = cache._replace(
        middle_keys=cache.middle_keys.masked_fill(padding[:, None, :, None], 1e4),
        middle_values=cache.middle_values.masked_fill(padding[:, None, :, None], -1e4),
    )
    clean, dirty = (QuantizedPrunedKV.quantize(c, 4, 64, 32) for c in (cache, poisoned))
    for name in ("key_scales", "key_zeros", "value_scales", "value_zeros"):
        assert torch.equal(getattr(clean, name), getattr(dirty, name)), name
    query = torch.randn(3, 4, 1, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        leank_attention_reference(query, dirty, 0.125), leank_attention_reference(query, clean, 0.125)
    )


@pytest.mark.parametrize("steps", [1, 3])
def test_quantized_reference_dequantizes_one_tile_at_a_time(monkeypatch, steps):
    """A middle of 130 slots read in tiles of 32 (two key blocks of 16): no dequantized tensor covers more than a tile,
    and the attention is the one-tile attention, to fp32 rounding."""
    cache = random_cache(2, 2, 64, 16, 4, 130, 9, torch.float32, seed=steps)
    query = torch.randn(2, 4, steps, 64, generator=torch.Generator().manual_seed(steps))
    quantized = QuantizedPrunedKV.quantize(cache, 4, 16, 32)
    whole = leank_attention_reference(query, quantized, 0.125)
    widths = []

    def recording(dequantize):
        def dequantized(part):
            widths.append(part.data.shape[-2])
            return dequantize(part)

        return dequantized

    monkeypatch.setattr(reference_module, "_DEQUANTIZED_TOKENS", 20)  # rounded up to whole blocks: 32
    monkeypatch.setattr(reference_module, "dequantize_keys", recording(reference_module.dequantize_keys))
    monkeypatch.setattr(reference_module, "dequantize_values", recording(reference_module.dequantize_values))
    tiled = leank_attention_reference(query, quantized, 0.125)
    assert max(widths) == 32 and sum(widths) == 2 * 130  # keys for the scores, values for the output
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
