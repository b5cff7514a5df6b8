"""Low-bit middle stores (`leank_hf.kernels.quantization`): the round trip within the bound its arithmetic promises,
the int4 byte layout, padding and degenerate groups."""

from __future__ import annotations

import math

import pytest
import torch

from leank_hf.kernels.quantization import (
    dequantize_keys,
    dequantize_values,
    pack_int4,
    quantize_keys,
    quantize_values,
    unpack_int4,
)

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
