"""The Triton decode kernel over a quantized middle (`QuantizedPrunedKV`, 8 and 4 bits) against the PyTorch reference,
which dequantizes it to fp32 (`leank_attention_reference`).

On the CPU it runs under TRITON_INTERPRET=1 (conftest.py) at small shapes. Middle lengths other than 0 are never
multiples of the key block (so last blocks are partial), and tiles and splits start inside blocks; key blocks of 16, 64
and 24 tokens, value groups of 16, 32 and head_dim channels; channel tiles of 16, 32 and 64. The breaks these tests
were seen to catch: the nibbles swapped, neighbour packing instead of halves, one key block per tile, key blocks off by
one token, zeros ignored, value groups of 16 channels whatever the group, value scales read unmasked, 4-bit key rows
read at the float row's stride, and the launcher's block and group constants or value-scale strides swapped.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from leank_hf.kernels import (
    ChannelLayout,
    LeanKAttention,
    NewTokens,
    PrunedKV,
    QuantizedPrunedKV,
    leank_attention,
    leank_attention_reference,
)
from leank_hf.kernels.decode import DecodeTuning, LeanKDecoder, _cache_signature, leank_decode_triton, supports

from .helpers import KERNEL_DEVICE, KERNEL_DTYPES, is_float_tensor, random_cache, reference
from .test_triton_decode import poisoned_buffers, window_copies  # noqa: F401 (poisoned_buffers: an autouse fixture)
from .tolerances import RELATIVE_ERROR, assert_close


def quantized_reference(query: torch.Tensor, cache: QuantizedPrunedKV, scaling: float) -> torch.Tensor:
    """The reference on fp32 copies of the query and the full-width tensors (the middle it dequantizes to fp32)."""
    stored = cache.cache
    upcast = stored._replace(
        **{f: getattr(stored, f).float() for f in PrunedKV._fields if is_float_tensor(getattr(stored, f))}
    )
    return leank_attention_reference(query.float(), cache._replace(cache=upcast), scaling)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


GRIDS = ("key_scales", "key_zeros", "value_scales", "value_zeros")


def first_slots(cache: QuantizedPrunedKV, length: int) -> QuantizedPrunedKV:
    """`cache` with only its first `length` middle slots (and the key blocks that hold them): what a layer hands
    to attention while its middle grows inside the same stores."""
    stored, blocks = cache.cache, -(-length // cache.block_size)
    return cache._replace(
        cache=stored._replace(
            middle_keys=stored.middle_keys[:, :, :length],
            middle_values=stored.middle_values[:, :, :length],
            middle_valid=stored.middle_valid[:, :length],
        ),
        key_scales=cache.key_scales[:, :, :blocks],
        key_zeros=cache.key_zeros[:, :, :blocks],
        value_scales=cache.value_scales[:, :, :length],
        value_zeros=cache.value_zeros[:, :, :length],
    )


# Tunings whose splits start inside key blocks, with tiles that straddle two blocks: given 4 programs at once (the
# CPU's number, set in the test on every device), 150 tokens of 3 rows split in 48s (tiles of 32: [48, 80) holds
# slots of blocks 0 and 1 of 64), 130 tokens of 2 rows in 80s (tiles of 16: [16, 32) holds slots of blocks 0 and 1 of
# 24).
TILES_OF_32 = DecodeTuning(block_n=32, min_split_tokens=32)
TILES_OF_16 = DecodeTuning(block_n=16, min_split_tokens=16)
SHAPES = [
    # batch, q heads, kv heads, head_dim, align, sink, middle, window, key block, value group, channel tile, tuning
    pytest.param(1, 4, 1, 64, 16, 4, 37, 9, 16, 16, 64, None, id="mqa-every-channel-kept-middle-37"),
    pytest.param(3, 8, 2, 64, 32, 8, 150, 20, 64, 32, 32, TILES_OF_32, id="batch3-gqa4-align32-splits-inside-blocks"),
    pytest.param(3, 3, 3, 32, 16, 3, 200, 5, 24, 32, 16, None, id="mha-head32-block24-group-head_dim"),
    pytest.param(2, 2, 2, 32, 16, 0, 1, 4, 16, 16, 16, None, id="middle-1-no-sink"),
    pytest.param(3, 4, 2, 64, 16, 4, 0, 6, 64, 64, 32, None, id="no-middle"),
    pytest.param(2, 8, 2, 64, 64, 5, 130, 7, 24, 64, 64, TILES_OF_16, id="chunk64-block24-splits-inside-blocks"),
    pytest.param(2, 4, 4, 64, 16, 2, 45, 3, 16, 32, 16, None, id="kept-0-16-48-64-in-one-tile"),
]
SHAPE_NAMES = ("batch", "hq", "h", "d", "align", "sink", "middle", "window", "block", "group", "chunk", "tuning")


def quantized_case(batch, hq, h, d, align, sink, middle, window, block, group, chunk, bits, dtype):
    """(query, quantized cache) of a case, checking that its layout has the channel tile the case is named for."""
    seed = hash((batch, hq, h, d, align, sink, middle, window)) % 2**31
    cache = random_cache(batch, h, d, align, sink, middle, window, dtype, seed, prune_head=0 if h > 1 else None)
    assert cache.layout.chunk == chunk
    query = torch.randn(batch, hq, 1, d, generator=torch.Generator().manual_seed(seed + 1)).to(KERNEL_DEVICE, dtype)
    return query, QuantizedPrunedKV.quantize(cache, bits, block, group)


@pytest.mark.parametrize(SHAPE_NAMES, SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_quantized_kernel_matches_reference(monkeypatch, batch, hq, h, d, align, sink, middle, window, block, group,
                                            chunk, tuning, bits, dtype):  # fmt: skip
    """Left padding (ragged middle starts), a fully pruned head where there are several, ragged sinks, holes in the
    window; with a tuning, splits that start inside key blocks."""
    from leank_hf.kernels import decode

    monkeypatch.setattr(decode, "_slots", lambda *args: 4)
    query, cache = quantized_case(batch, hq, h, d, align, sink, middle, window, block, group, chunk, bits, dtype)
    assert supports(query, cache)
    scaling = 0.7 / d**0.5
    decoder = LeanKDecoder(tuning)
    out = decoder(query, cache, scaling)
    assert out.shape == query.shape and out.dtype == dtype
    assert_close(out, quantized_reference(query, cache, scaling), dtype)
    if tuning is not None:
        split_tokens, splits = decoder._split_plan[1]
        assert splits > 1 and split_tokens % block, (split_tokens, splits)  # the second split starts inside a block


@pytest.mark.parametrize(SHAPE_NAMES, [SHAPES[1], SHAPES[6]])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kernel_writes_this_steps_token_as_it_attends(batch, hq, h, d, align, sink, middle, window, block,
                                                                group, chunk, tuning, bits):  # fmt: skip
    """As for a float middle: the window's last slot holds NaN and the wrong flag until the kernel writes this step's
    token there (row 0 padding), leaving the window exactly as `NewTokens.write` does."""
    dtype = KERNEL_DTYPES[0]
    query, cache = quantized_case(batch, hq, h, d, align, sink, middle, window, block, group, chunk, bits, dtype)
    gen = torch.Generator().manual_seed(bits)
    keys = torch.randn(batch, h, 1, d, generator=gen).to(KERNEL_DEVICE, dtype)
    values = torch.randn(batch, 1, h, d, generator=gen).to(KERNEL_DEVICE, dtype).transpose(1, 2)
    new = NewTokens(keys, values, (torch.arange(batch) % 2 == 1)[:, None].to(KERNEL_DEVICE))
    written = cache._replace(cache=window_copies(cache.cache))
    new.write(written)
    unwritten = cache._replace(cache=window_copies(cache.cache))
    unwritten.cache.recent_keys[:, :, -1] = float("nan")
    unwritten.cache.recent_values[:, :, -1] = float("nan")
    unwritten.cache.recent_valid[:, -1] = ~written.cache.recent_valid[:, -1]
    out = leank_decode_triton(query, unwritten, 0.1, tuning, new=new)
    assert_close(out, quantized_reference(query, written, 0.1), dtype)
    for field in ("recent_keys", "recent_values", "recent_valid"):
        assert torch.equal(getattr(unwritten.cache, field), getattr(written.cache, field)), field


@pytest.mark.parametrize(("bits", "block"), [(8, 24), (4, 16)])
def test_quantized_middle_length_read_on_the_device(bits, block):
    """With `middle_length`, the codes and value scales are the stores' capacity (130 slots) and the key scales cover
    it (ceil(130 / block) blocks). Past the length the codes are 0xFF and the value scales and zeros NaN, and so are
    the key scales and zeros of the blocks past the length's: reading one cannot pass. Lengths inside a block, below
    a row's middle start, zero and the whole capacity; one decoder follows the length as it changes."""
    dtype, capacity = KERNEL_DTYPES[0], 130
    cache = random_cache(3, 2, 64, 16, 4, capacity, 9, dtype, seed=bits)
    starts = torch.tensor([0, 30, 100], device=KERNEL_DEVICE)
    cache = cache._replace(
        middle_start=starts, middle_valid=torch.arange(capacity, device=KERNEL_DEVICE) >= starts[:, None]
    )
    cache = QuantizedPrunedKV.quantize(cache, bits, block, 32)
    assert cache.cache.layout.value_rows > 0
    query = torch.randn(3, 8, 1, 64, generator=torch.Generator().manual_seed(bits)).to(KERNEL_DEVICE, dtype)
    decoder = LeanKDecoder(DecodeTuning(block_n=16, min_split_tokens=32))
    for length in (0, 19, 77, capacity):
        expected = quantized_reference(query, first_slots(cache, length), 0.125)
        blocks = -(-length // block)
        poisoned = cache._replace(
            cache=cache.cache._replace(
                middle_keys=cache.cache.middle_keys.clone(),
                middle_values=cache.cache.middle_values.clone(),
                middle_length=torch.tensor(length, device=KERNEL_DEVICE),
            ),
            **{name: getattr(cache, name).clone() for name in GRIDS},
        )
        poisoned.cache.middle_keys[:, :, length:] = 0xFF
        poisoned.cache.middle_values[:, :, length:] = 0xFF
        for name in ("key_scales", "key_zeros"):
            getattr(poisoned, name)[:, :, blocks:] = float("nan")
        for name in ("value_scales", "value_zeros"):
            getattr(poisoned, name)[:, :, length:] = float("nan")
        assert_close(decoder(query, poisoned, 0.125), expected, dtype)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layer_with_every_head_fully_pruned(bits):
    dtype = KERNEL_DTYPES[0]
    cache = random_cache(2, 2, 64, 16, 4, 50, 6, dtype, seed=3)
    layout = ChannelLayout.from_mask(torch.zeros(2, 64, dtype=torch.bool), KERNEL_DEVICE)
    cache = cache._replace(layout=layout, middle_keys=cache.middle_keys[:, :0],
                           middle_values=cache.middle_values[:, :0])  # fmt: skip
    cache = QuantizedPrunedKV.quantize(cache, bits, 16, 32)
    query = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE, dtype)
    assert_close(leank_decode_triton(query, cache, 0.125), quantized_reference(query, cache, 0.125), dtype)


def altered(cache: QuantizedPrunedKV, name: str, generator: torch.Generator) -> QuantizedPrunedKV:
    """`cache` with one of its quantized tensors changed: codes XORed with random bytes, scales and zeros moved by
    random amounts of their own size."""
    if name in ("middle_keys", "middle_values"):
        codes = getattr(cache.cache, name)
        noise = torch.randint(1, 256, codes.shape, generator=generator, dtype=torch.uint8).to(codes.device)
        return cache._replace(cache=cache.cache._replace(**{name: codes ^ noise}))
    grid = getattr(cache, name)
    noise = torch.rand(grid.shape, generator=generator).to(grid.device) + 0.5  # x0.5 to x1.5, or +- the value
    moved = grid * noise if name.endswith("scales") else grid + (noise - 1.0) * 2 * grid.abs().mean()
    return cache._replace(**{name: moved.to(grid.dtype)})


def test_quantized_kernel_reads_every_code_scale_and_zero():
    """A 4-bit middle alone (sink and window emptied, so nothing dilutes it): changing any one of the key codes, key
    scales, key zeros, value codes, value scales or value zeros changes the attention by far more than the
    tolerance, and the kernel follows each change as the reference does. No float middle exists beside the codes
    (`QuantizedPrunedKV.cache` holds them in its place), and the attention over it is far from the float middle's."""
    dtype = KERNEL_DTYPES[0]
    cache = random_cache(2, 2, 64, 16, 4, 100, 6, dtype, seed=17, prune_head=None)
    cache = cache._replace(sink_lengths=torch.zeros_like(cache.sink_lengths),
                           recent_valid=torch.zeros_like(cache.recent_valid))  # fmt: skip
    quantized = QuantizedPrunedKV.quantize(cache, 4, 24, 16)
    assert quantized.cache.middle_keys.dtype == quantized.cache.middle_values.dtype == torch.uint8
    query = torch.randn(2, 8, 1, 64, generator=torch.Generator().manual_seed(18)).to(KERNEL_DEVICE, dtype)
    expected = quantized_reference(query, quantized, 0.125)
    out = leank_decode_triton(query, quantized, 0.125)
    assert_close(out, expected, dtype)
    bound = RELATIVE_ERROR[dtype]
    float_middle = leank_decode_triton(query, cache, 0.125)
    assert relative_difference(out, float_middle) > 10 * bound, "4 bits are indistinguishable from the float middle"
    generator = torch.Generator().manual_seed(19)
    for name in ("middle_keys", "key_scales", "key_zeros", "middle_values", "value_scales", "value_zeros"):
        changed = altered(quantized, name, generator)
        expected_changed = quantized_reference(query, changed, 0.125)
        assert relative_difference(expected_changed, expected) > 10 * bound, name
        assert_close(leank_decode_triton(query, changed, 0.125), expected_changed, dtype)


def test_one_decoder_follows_float_and_quantized_middles():
    """One `LeanKDecoder` across float and quantized middles of one cache, other bit widths and key blocks, and scales
    reallocated with other strides or in another dtype: each change is noticed (the scales are part of the cache's
    signature) and decoded right."""
    dtype = KERNEL_DTYPES[0]
    cache = random_cache(2, 2, 64, 16, 4, 90, 7, dtype, seed=23)
    eight, four = QuantizedPrunedKV.quantize(cache, 8, 16, 32), QuantizedPrunedKV.quantize(cache, 4, 24, 64)

    def restrided(grid: torch.Tensor) -> torch.Tensor:
        wider = torch.full((*grid.shape[:2], grid.shape[2] + 5, grid.shape[3]), float("nan"), dtype=grid.dtype)
        wider = wider.to(grid.device)
        wider[:, :, : grid.shape[2]] = grid
        return wider[:, :, : grid.shape[2]]

    key_restrided = four._replace(key_scales=restrided(four.key_scales), key_zeros=restrided(four.key_zeros))
    value_restrided = key_restrided._replace(value_scales=restrided(four.value_scales),
                                             value_zeros=restrided(four.value_zeros))  # fmt: skip
    fp32_scales = four._replace(key_scales=four.key_scales.float(), value_zeros=four.value_zeros.float())
    steps = [cache, eight, four, key_restrided, value_restrided, fp32_scales, cache]
    signatures = {_cache_signature(step)[1] for step in steps}
    assert len(signatures) == len(steps) - 1  # the float cache comes back last
    decoder = LeanKDecoder()
    gen = torch.Generator().manual_seed(24)
    for step in steps:
        query = torch.randn(2, 4, 1, 64, generator=gen).to(KERNEL_DEVICE, dtype)
        quantized = isinstance(step, QuantizedPrunedKV)
        expected = quantized_reference(query, step, 0.1) if quantized else reference(query, step, 0.1)
        assert_close(decoder(query, step, 0.1), expected, dtype)


@pytest.mark.parametrize("kernel_device", [True, False], ids=["kernel", "reference"])
def test_dispatch_takes_a_quantized_cache_with_this_steps_token(monkeypatch, kernel_device):
    """`LeanKAttention` with this step's token: on a kernel device the kernel writes it, elsewhere `NewTokens.write`
    writes it into the quantized cache's window before the reference runs; `leank_attention` takes the cache too."""
    monkeypatch.setattr(LeanKAttention, "kernel_devices", ("cuda", "cpu") if kernel_device else ("cuda",))
    dtype = KERNEL_DTYPES[0]
    cache = QuantizedPrunedKV.quantize(random_cache(2, 2, 64, 16, 4, 70, 6, dtype, seed=29), 4, 64, 32)
    gen = torch.Generator().manual_seed(30)
    query = torch.randn(2, 4, 1, 64, generator=gen).to(KERNEL_DEVICE, dtype)
    new = NewTokens(*(torch.randn(2, 2, 1, 64, generator=gen).to(KERNEL_DEVICE, dtype) for _ in range(2)), None)
    written = cache._replace(cache=window_copies(cache.cache))
    new.write(written)
    expected = quantized_reference(query, written, 0.125)
    out = LeanKAttention()(query, cache, 0.125, new)
    assert_close(out, expected, dtype)
    assert torch.equal(cache.cache.recent_keys, written.cache.recent_keys)
    assert_close(leank_attention(query, cache, 0.125), expected, dtype)


def test_supports_and_checks_of_a_quantized_middle():
    """`supports` takes 8 and 4 bits, any key block and value groups dividing head_dim; `_check` names what a
    quantized cache's tensors lack."""
    dtype = KERNEL_DTYPES[0]
    cache = random_cache(1, 2, 64, 16, 2, 40, 3, dtype, seed=0)
    quantized = QuantizedPrunedKV.quantize(cache, 4, 7, 16)
    query = torch.randn(1, 2, 1, 64, dtype=dtype, device=KERNEL_DEVICE)
    assert supports(query, quantized)
    assert not supports(query, quantized._replace(bits=2)), "2 bits"
    assert not supports(query, quantized._replace(group_size=24)), "groups that do not divide head_dim"
    assert not supports(query, quantized._replace(block_size=0))
    assert not supports(query, quantized._replace(cache=quantized.cache._replace(middle_start=None)))
    with pytest.raises(ValueError, match="value groups of 24 channels"):
        leank_decode_triton(query, quantized._replace(group_size=24), 0.125)
    with pytest.raises(ValueError, match="codes must be uint8"):
        leank_decode_triton(query, quantized._replace(cache=cache), 0.125)
    too_few = {name: getattr(quantized, name)[:, :, :5] for name in ("key_scales", "key_zeros")}
    with pytest.raises(ValueError, match=r"key scales and zeros .*, >= 6, "):  # 40 slots in blocks of 7
        leank_decode_triton(query, quantized._replace(**too_few), 0.125)
    with pytest.raises(ValueError, match="value scales and zeros must be float tensors of one layout"):
        column_major = quantized.value_zeros.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, new strides
        leank_decode_triton(query, quantized._replace(value_zeros=column_major), 0.125)
    with pytest.raises(ValueError, match=r"chunk-major with contiguous chunks of \d+ bytes"):
        leank_decode_triton(query, quantized._replace(bits=8), 0.125)
