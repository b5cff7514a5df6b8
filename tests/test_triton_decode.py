"""The Triton decode kernel against the PyTorch reference on fresh random pruned caches.

On the CPU it runs under TRITON_INTERPRET=1 (conftest.py sets it before Triton is imported) at small shapes; with
CUDA the compiled kernel runs, at larger shapes too.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from leank_hf.kernels import ChannelLayout, NewTokens, PrunedKV
from leank_hf.kernels.decode import DecodeTuning, LeanKDecoder, leank_decode_triton, supports

from .helpers import KERNEL_DEVICE, KERNEL_DTYPES, is_float_tensor, random_cache, reference
from .tolerances import assert_close


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Float buffers the kernel allocates start as NaN, so an output or partial it never writes cannot pass."""
    allocate = torch.empty

    def poisoned(*args, **kwargs):
        tensor = allocate(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", poisoned)


SHAPES = [
    # batch, q heads, kv heads, head_dim, align, sink, middle, window
    pytest.param(1, 4, 2, 64, 16, 4, 37, 9, id="gqa2-odd-lengths"),
    pytest.param(3, 8, 2, 64, 32, 8, 130, 40, id="batch3-gqa4-align32"),
    pytest.param(2, 2, 2, 64, 16, 0, 0, 5, id="no-sink-no-middle"),
    pytest.param(2, 1, 1, 32, 16, 3, 65, 1, id="mha-single-head-window-1"),
    pytest.param(1, 8, 1, 128, 32, 16, 300, 17, id="mqa-head128"),
    pytest.param(2, 4, 2, 64, 16, 40, 20, 200, id="full-width-tokens-over-several-splits"),
    # 40 + 89 = 128 + 1 full-width tokens: this step's token alone opens the second share (DecodeTuning's 128 each)
    pytest.param(2, 4, 2, 64, 16, 40, 20, 89, id="this-steps-token-opens-a-full-width-split"),
]


@pytest.mark.parametrize(("batch", "hq", "h", "d", "align", "sink", "middle", "window"), SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_matches_reference(batch, hq, h, d, align, sink, middle, window, dtype):
    seed = hash((batch, hq, h, d, sink, middle, window)) % 2**31
    cache = random_cache(batch, h, d, align, sink, middle, window, dtype, seed, prune_head=0 if h > 1 else None)
    query = torch.randn(batch, hq, 1, d, generator=torch.Generator().manual_seed(seed + 1)).to(KERNEL_DEVICE, dtype)
    scaling = 0.7 / d**0.5  # any scaling the model passes (Gemma3 does not use 1/sqrt(d))
    assert supports(query, cache)
    out = leank_decode_triton(query, cache, scaling)
    assert out.shape == query.shape and out.dtype == dtype
    assert_close(out, reference(query, cache, scaling), dtype)


def window_copies(cache: PrunedKV) -> PrunedKV:
    return cache._replace(**{f: getattr(cache, f).clone() for f in ("recent_keys", "recent_values", "recent_valid")})


@pytest.mark.parametrize(("batch", "hq", "h", "d", "align", "sink", "middle", "window"), SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("padded", [False, True], ids=["all-real", "some-rows-padding"])
def test_kernel_writes_this_steps_token_as_it_attends(batch, hq, h, d, align, sink, middle, window, dtype, padded):
    """Given `new`, the window's last slot is not written yet (here: NaN keys and values, the wrong flag). The kernel
    must attend as the reference does once `NewTokens.write` has stored the token, and leave the window exactly as
    that write does. New values are strided as transformers' projections give them (heads not outermost)."""
    seed = hash((batch, hq, h, d, sink, middle, window, padded)) % 2**31
    cache = random_cache(batch, h, d, align, sink, middle, window, dtype, seed, prune_head=0 if h > 1 else None)
    gen = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(batch, hq, 1, d, generator=gen).to(KERNEL_DEVICE, dtype)
    keys = torch.randn(batch, h, 1, d, generator=gen).to(KERNEL_DEVICE, dtype)
    values = torch.randn(batch, 1, h, d, generator=gen).to(KERNEL_DEVICE, dtype).transpose(1, 2)
    valid = (torch.arange(batch) % 2 == 1)[:, None].to(KERNEL_DEVICE) if padded else None  # row 0 pads: batch 1 too
    new = NewTokens(keys, values, valid)
    written = window_copies(cache)
    new.write(written)
    unwritten = window_copies(cache)
    unwritten.recent_keys[:, :, -1] = float("nan")
    unwritten.recent_values[:, :, -1] = float("nan")
    unwritten.recent_valid[:, -1] = ~written.recent_valid[:, -1]
    out = leank_decode_triton(query, unwritten, 0.1, new=new)
    assert_close(out, reference(query, written, 0.1), dtype)
    for field in ("recent_keys", "recent_values", "recent_valid"):
        assert torch.equal(getattr(unwritten, field), getattr(written, field)), field


@pytest.mark.parametrize(("batch", "hq", "h", "d", "align", "sink", "middle", "window"), SHAPES)
def test_middle_length_read_on_the_device(batch, hq, h, d, align, sink, middle, window):
    """With `middle_length`, the middle tensors are the stores' capacity and only slots below the length (a device
    scalar) are read: slots past it hold NaN here, so reading one cannot pass. Lengths shorter than some rows'
    `middle_start`, zero, and the whole capacity included; one decoder follows the length as it changes."""
    seed = hash((batch, hq, h, d, sink, middle, window, "length")) % 2**31
    cache = random_cache(
        batch, h, d, align, sink, middle + 40, window, torch.float16, seed, prune_head=0 if h > 1 else None
    )
    assert cache.layout.value_rows > 0, "no head keeps channels: nothing reads the middle"
    query = torch.randn(batch, hq, 1, d, generator=torch.Generator().manual_seed(seed)).to(KERNEL_DEVICE, torch.float16)
    decoder = LeanKDecoder()
    for length in sorted({0, middle // 3, middle, middle + 40}):
        stored = sliced(cache, sink, length, window)
        expected = reference(query, stored, 0.125)
        poisoned = cache._replace(middle_keys=cache.middle_keys.clone(), middle_values=cache.middle_values.clone())
        poisoned.middle_keys[:, :, length:] = float("nan")
        poisoned.middle_values[:, :, length:] = float("nan")
        on_device = poisoned._replace(middle_length=torch.tensor(length, device=KERNEL_DEVICE))
        assert_close(decoder(query, on_device, 0.125), expected, torch.float16)


def test_decoder_reads_the_cache_again_only_when_its_version_changes(monkeypatch):
    """With `cache_version`, the cache's strides are read once per version: steps whose tokens grow inside the same
    stores reuse them, and stores reallocated under a new version are read again (and decoded right)."""
    from leank_hf.kernels import decode

    reads = []
    signature = decode._cache_signature
    monkeypatch.setattr(decode, "_cache_signature", lambda cache: reads.append(1) or signature(cache))
    dtype = KERNEL_DTYPES[-1]
    full = random_cache(2, 2, 64, 16, 6, 300, 60, dtype, seed=45)
    gen = torch.Generator().manual_seed(46)
    decoder = LeanKDecoder(DecodeTuning(block_n=16, min_split_tokens=32))
    steps = [(sliced(full, 6, 100, 10), 1), (sliced(full, 6, 100, 11), 1), (sliced(full, 6, 200, 12), 1)]
    steps += [(with_middle_capacity(sliced(full, 6, 200, 13), 400), 2), (sliced(full, 6, 250, 14), 3)]
    for cache, version in steps:
        query = torch.randn(2, 4, 1, 64, generator=gen).to(KERNEL_DEVICE, dtype)
        assert_close(decoder(query, cache, 0.1, cache_version=version), reference(query, cache, 0.1), dtype)
    assert len(reads) == 3


TUNINGS = [
    # tuning, and the plan it gives here: (tokens per middle split, middle splits, full-width splits)
    pytest.param(DecodeTuning(block_n=16, min_split_tokens=16, max_waves=64), (32, 10, 2), id="many-small-splits"),
    pytest.param(
        DecodeTuning(block_n=16, num_stages=3, min_split_tokens=32, max_waves=8), (48, 7, 2), id="three-stages"
    ),
    pytest.param(
        DecodeTuning(block_n=32, num_warps=8, min_split_tokens=48), (80, 4, 2), id="block32-8warps-uneven-splits"
    ),
    pytest.param(DecodeTuning(block_n=64, max_waves=1, min_split_tokens=1024), (304, 1, 2), id="one-split-per-head"),
    pytest.param(DecodeTuning(block_n=16, full_split_tokens=48), (304, 1, 4), id="full-width-splits-of-48"),
]


@pytest.mark.parametrize(("tuning", "plan"), TUNINGS)
def test_every_tuning_gives_the_same_attention(monkeypatch, tuning, plan):
    """The split plan follows the programs the GPU holds at once (with the CPU's 4, "uneven-splits" planned one middle
    split, and an H100 plans splits of 64 there), so the test sets 13: the 9 middle rows (3 rows x 3 heads keeping
    channels) then get the plans named on any device (uneven: splits of 80 tokens, 2.5 tiles of 32). The plan is
    (tokens per middle split, middle splits, full-width splits), the last read off the split launch's grid.
    num_warps and num_stages reach only the compiled kernel."""
    from leank_hf.kernels import decode
    from leank_hf.kernels.decode_kernels import _leank_decode_kernel

    monkeypatch.setattr(decode, "_slots", lambda *args: 13)
    grids = []
    launch = decode.launch

    def recording_launch(kernel, compiled, grid, *args):
        grids.append((kernel, grid))
        return launch(kernel, compiled, grid, *args)

    monkeypatch.setattr(decode, "launch", recording_launch)
    dtype = KERNEL_DTYPES[-1]
    cache = random_cache(3, 4, 64, 16, 5, 300, 140, dtype, seed=7)
    query = torch.randn(3, 8, 1, 64, generator=torch.Generator().manual_seed(8)).to(KERNEL_DEVICE, dtype)
    decoder = LeanKDecoder(tuning)
    assert_close(decoder(query, cache, 0.1), reference(query, cache, 0.1), dtype)
    ((split_grid,),) = [grid for kernel, grid in grids if kernel is _leank_decode_kernel]
    split_tokens, middle_splits = decoder._split_plan[1]
    full_width_programs = split_grid - 3 * 3 * middle_splits  # batch 3 x 3 value rows per middle split
    assert (split_tokens, middle_splits, full_width_programs / (3 * 4)) == plan  # batch 3 x 4 heads per share


@pytest.mark.parametrize(
    ("slots", "tile"),
    [(10, (16, 64)), (25, (32, 32)), (50, (64, 32)), (100, (128, 16)), (150, (128, 16))],
    ids=["splits-le-16", "splits-le-32", "splits-le-64", "splits-le-128", "splits-over-128"],
)
def test_merge_tiles_of_every_split_count_bucket(monkeypatch, slots, tile):
    """Every split tile of the merge (16, 32, 64, 128 splits), and more splits than one tile holds (two merge steps
    of 128), head_dim 128 cut into channel tiles. The split count follows the programs the GPU holds at once (one
    middle row here: one split per program of a wave), so the test sets that number."""
    from leank_hf.kernels import decode

    monkeypatch.setattr(decode, "_slots", lambda *args: slots)
    dtype = KERNEL_DTYPES[-1]
    cache = random_cache(1, 2, 128, 16, 4, 2400, 40, dtype, seed=slots, prune_head=1)
    query = torch.randn(1, 4, 1, 128, generator=torch.Generator().manual_seed(5)).to(KERNEL_DEVICE, dtype)
    decoder = LeanKDecoder(DecodeTuning(block_n=16, min_split_tokens=16))
    assert_close(decoder(query, cache, 0.1), reference(query, cache, 0.1), dtype)
    splits = decoder._split_plan[1][1] + 1  # the middle's, and one full-width split (sink 4 + window 40)
    assert decode._merge_tile(splits, 128) == tile
    assert (splits > 128) == (slots == 150)


@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_merge_tiles_hold_the_splits_in_a_few_buckets(head_dim):
    """A merge program reads every split in one step up to 128 (more take steps of 128), in the smallest power-of-two
    tile of at least 16 that holds them, so that split counts share a few compiled merges; its channel tile is a
    power of two that divides the head. Which channel tile each bucket takes is tuning (`_MERGE_CHANNELS`)."""
    from leank_hf.kernels.decode import _merge_tile

    tiles = {splits: _merge_tile(splits, head_dim) for splits in range(1, 301)}
    for splits, (split_tile, channel_tile) in tiles.items():
        assert split_tile in (16, 32, 64, 128), splits
        assert split_tile >= min(splits, 128) and (split_tile == 16 or split_tile // 2 < splits), splits
        assert channel_tile & (channel_tile - 1) == 0 and head_dim % channel_tile == 0, splits
    assert len(set(tiles.values())) == 4


def test_heads_keeping_none_few_and_all_channels_share_one_launch():
    """Kept counts 0, 16, 32 and 128 of 128 in one layer: one tile width, lanes masked per head."""
    dtype = KERNEL_DTYPES[-1]
    mask = torch.zeros(4, 128, dtype=torch.bool)
    for head, count in enumerate([0, 16, 32, 128]):
        mask[head, torch.randperm(128, generator=torch.Generator().manual_seed(head))[:count]] = True
    cache = random_cache(2, 4, 128, 16, 3, 150, 7, dtype, seed=11)
    layout = ChannelLayout.from_mask(mask, KERNEL_DEVICE)
    middle_keys = torch.randn(*layout.middle_key_shape(2, 150), generator=torch.Generator().manual_seed(12))
    middle_values = torch.randn(2, 3, 150, 128, generator=torch.Generator().manual_seed(13))
    cache = cache._replace(layout=layout, middle_keys=middle_keys.to(KERNEL_DEVICE, dtype),
                           middle_values=middle_values.to(KERNEL_DEVICE, dtype))  # fmt: skip
    query = torch.randn(2, 8, 1, 128, generator=torch.Generator().manual_seed(14)).to(KERNEL_DEVICE, dtype)
    expected = reference(query, cache, 0.09)
    assert_close(leank_decode_triton(query, cache, 0.09, DecodeTuning(min_split_tokens=64)), expected, dtype)


def test_every_head_fully_pruned_reads_only_sink_and_window():
    dtype = KERNEL_DTYPES[-1]
    cache = random_cache(2, 2, 64, 16, 4, 50, 6, dtype, seed=3)
    layout = ChannelLayout.from_mask(torch.zeros(2, 64, dtype=torch.bool), KERNEL_DEVICE)
    cache = cache._replace(
        layout=layout,
        middle_keys=cache.middle_keys[:, :0],
        middle_values=cache.middle_values[:, :0],
    )
    query = torch.randn(2, 4, 1, 64).to(KERNEL_DEVICE, dtype)
    assert_close(leank_decode_triton(query, cache, 0.125), reference(query, cache, 0.125), dtype)


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="large shapes only with the compiled kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "middle"), [(1, 32768), (8, 4000), (32, 1500)])
def test_kernel_matches_reference_at_real_shapes(dtype, batch, middle):
    cache = random_cache(batch, 8, 128, 32, 64, middle, 300, dtype, seed=batch)
    query = torch.randn(batch, 32, 1, 128, device=KERNEL_DEVICE, dtype=dtype)
    out = leank_decode_triton(query, cache, 128**-0.5)
    assert_close(out, reference(query, cache, 128**-0.5), dtype)


def test_cache_with_gaps_in_real_middle_tokens_takes_the_reference_path(monkeypatch):
    """`leank_attention` dispatches a cache whose middle_start is unknown to the PyTorch path, on any device (the CPU
    is made a kernel device here, or its tensors would take that path whatever the cache; the kernel raises on it)."""
    from leank_hf.kernels import LeanKAttention, leank_attention

    monkeypatch.setattr(LeanKAttention, "kernel_devices", ("cuda", "cpu"))

    dtype = KERNEL_DTYPES[-1]
    cache = random_cache(2, 2, 64, 16, 4, 90, 6, dtype, seed=21)
    holes = torch.rand(2, 90, generator=torch.Generator().manual_seed(22)) > 0.3
    cache = cache._replace(middle_valid=holes.to(KERNEL_DEVICE), middle_start=None)
    query = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(23)).to(KERNEL_DEVICE, dtype)
    assert_close(leank_attention(query, cache, 0.125), reference(query, cache, 0.125), dtype)


def test_supports_only_what_the_kernel_handles():
    cache = random_cache(1, 2, 64, 16, 2, 10, 3, torch.bfloat16, seed=0)
    query = torch.randn(1, 2, 1, 64, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    assert supports(query, cache)
    assert not supports(query.float(), cache), "fp32 takes the reference path"
    assert not supports(torch.randn(1, 2, 3, 64, dtype=torch.bfloat16, device=KERNEL_DEVICE), cache), "Q > 1"
    eight_channels = torch.zeros(2, 64, dtype=torch.bool)
    eight_channels[0, :8] = True  # tiles of 8 channels are below tl.dot's minimum of 16
    assert not supports(query, cache._replace(layout=ChannelLayout.from_mask(eight_channels)))
    assert not supports(query, cache._replace(middle_start=None)), "real middle tokens not contiguous"
    strided = torch.randn(1, 2, 1, 128, dtype=torch.bfloat16, device=KERNEL_DEVICE)[..., ::2]
    assert not supports(strided, cache), "channels of the query not contiguous"
    with pytest.raises(ValueError, match="channel stride 2"):
        leank_decode_triton(strided, cache, 0.125)


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="CUDA graphs need CUDA")
def test_replayed_cuda_graph_matches_reference():
    """Captured once, replayed on new data written in place; on Hopper the graph holds the merge's dependent
    launch."""
    cache = random_cache(4, 8, 128, 32, 64, 5000, 300, torch.bfloat16, seed=31)
    query = torch.randn(4, 32, 1, 128, device=KERNEL_DEVICE, dtype=torch.bfloat16)
    leank_decode_triton(query, cache, 128**-0.5)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = leank_decode_triton(query, cache, 128**-0.5)
    for _ in range(3):
        for tensor in (query, *filter(is_float_tensor, cache)):
            tensor.normal_()
        graph.replay()
        assert_close(out, reference(query, cache, 128**-0.5), torch.bfloat16)


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="CUDA graphs need CUDA")
def test_replayed_cuda_graph_follows_the_middle_length_on_the_device():
    """Captured at one stored length, replayed at others set in place: what a compiled decode step relies on."""
    cache = random_cache(2, 8, 128, 32, 64, 3000, 320, torch.bfloat16, seed=37)
    length = torch.tensor(1000, device=KERNEL_DEVICE)
    on_device = cache._replace(middle_length=length)
    query = torch.randn(2, 32, 1, 128, device=KERNEL_DEVICE, dtype=torch.bfloat16)
    leank_decode_triton(query, on_device, 128**-0.5)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = leank_decode_triton(query, on_device, 128**-0.5)
    for stored in (0, 1000, 2047, 3000):
        length.fill_(stored)
        graph.replay()
        assert_close(out, reference(query, sliced(cache, 64, stored, 320), 128**-0.5), torch.bfloat16)


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="compilation happens only with the compiled kernel")
def test_growing_lengths_never_recompile():
    from leank_hf.kernels.decode_kernels import _leank_decode_kernel, _merge_kernel

    def compiled() -> int:
        kernels = (_leank_decode_kernel, _merge_kernel)
        return sum(len(caches[0]) for k in kernels for caches in k.device_caches.values())

    query = torch.randn(2, 8, 1, 64, device=KERNEL_DEVICE, dtype=torch.float16)
    leank_decode_triton(query, random_cache(2, 2, 64, 16, 4, 1000, 257, torch.float16, seed=0), 0.125)
    before = compiled()
    for step in range(1, 64):  # window and middle lengths through every residue mod 16
        cache = random_cache(2, 2, 64, 16, 4, 1000 + 7 * step, 257 + step, torch.float16, seed=0)
        leank_decode_triton(query, cache, 0.125)
    assert compiled() == before


def sliced(cache: PrunedKV, sink: int, middle: int, window: int) -> PrunedKV:
    """The first `sink` / `middle` / `window` slots of `cache`'s segments: live views of the same stores, as a layer
    hands them to attention while its tokens grow."""
    return cache._replace(
        sink_keys=cache.sink_keys[:, :, :sink],
        sink_values=cache.sink_values[:, :, :sink],
        sink_lengths=cache.sink_lengths.clamp(max=sink),
        middle_keys=cache.middle_keys[:, :, :middle],
        middle_values=cache.middle_values[:, :, :middle],
        middle_valid=cache.middle_valid[:, :middle],
        recent_keys=cache.recent_keys[:, :, :window],
        recent_values=cache.recent_values[:, :, :window],
        recent_valid=cache.recent_valid[:, :window],
    )


def with_middle_capacity(cache: PrunedKV, capacity: int) -> PrunedKV:
    """The same tokens in middle stores reallocated with room for `capacity` tokens (new strides, same layout)."""
    middle = cache.middle_len

    def regrown(store: torch.Tensor) -> torch.Tensor:
        grown = torch.full((*store.shape[:2], capacity, store.shape[3]), float("nan"), dtype=store.dtype)
        grown = grown.to(store.device)
        grown[:, :, :middle] = store
        return grown[:, :, :middle]

    return cache._replace(middle_keys=regrown(cache.middle_keys), middle_values=regrown(cache.middle_values))


def misaligned(query: torch.Tensor) -> torch.Tensor:
    """`query`'s values at an address 8 bytes past a 16-byte boundary (Triton specialises on that alignment)."""
    buffer = torch.zeros(*query.shape[:-1], query.shape[-1] + 8, dtype=query.dtype, device=query.device)
    view = buffer[..., 4 : 4 + query.shape[-1]]
    view.copy_(query)
    assert view.data_ptr() % 16 == 8
    return view


def test_one_decoder_follows_a_cache_through_every_change():
    """A `LeanKDecoder` kept from step to step matches the reference at every step: lengths growing inside the same
    stores, the middle stores reallocated (new strides), new tensors with the same strides (a beam reorder), a
    misaligned query, another batch size, another layout. With CUDA, the steps that change nothing it specialises
    on launch the compiled kernels directly."""
    dtype = KERNEL_DTYPES[-1]
    gen = torch.Generator().manual_seed(41)
    full = random_cache(3, 2, 64, 16, 6, 400, 90, dtype, seed=41)
    beams = torch.tensor([2, 0, 0], device=KERNEL_DEVICE)
    steps = [
        sliced(full, 0, 0, 1),
        sliced(full, 3, 0, 30),
        sliced(full, 6, 100, 10),
        sliced(full, 6, 100, 11),
        sliced(full, 6, 300, 70),
        with_middle_capacity(sliced(full, 6, 300, 71), 512),
        full._replace(**{f: t.index_select(0, beams) for f, t in full._asdict().items() if torch.is_tensor(t)}),
        random_cache(2, 2, 64, 16, 6, 200, 40, dtype, seed=42),
        random_cache(2, 2, 64, 32, 6, 200, 40, dtype, seed=43),
    ]
    decoder = LeanKDecoder(DecodeTuning(block_n=16, min_split_tokens=32, max_waves=8))
    for step, cache in enumerate(steps):
        query = torch.randn(cache.sink_lengths.shape[0], 4, 1, 64, generator=gen).to(KERNEL_DEVICE, dtype)
        if step == 4:
            query = misaligned(query)
        assert_close(decoder(query, cache, 0.1), reference(query, cache, 0.1), dtype)


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="the interpreter compiles nothing, so every launch goes through it")
def test_decoder_skips_triton_binding_until_strides_change(monkeypatch):
    from leank_hf.kernels.decode_kernels import _leank_decode_kernel

    jit_launches = []
    run = _leank_decode_kernel.run
    monkeypatch.setattr(_leank_decode_kernel, "run", lambda *a, **k: jit_launches.append(1) or run(*a, **k))
    full = random_cache(2, 8, 128, 32, 64, 3000, 320, torch.bfloat16, seed=44)
    query = torch.randn(2, 32, 1, 128, device=KERNEL_DEVICE, dtype=torch.bfloat16)
    decoder = LeanKDecoder()
    for middle, window in [(2000, 256), (2000, 257), (2064, 256), (2900, 300)]:
        cache = sliced(full, 64, middle, window)
        assert_close(decoder(query, cache, 0.09), reference(query, cache, 0.09), torch.bfloat16)
    assert len(jit_launches) == 1
    cache = with_middle_capacity(sliced(full, 64, 2900, 301), 4096)
    assert_close(decoder(query, cache, 0.09), reference(query, cache, 0.09), torch.bfloat16)
    assert len(jit_launches) == 2


@pytest.mark.parametrize(
    ("rows", "middle_len", "slots"),
    [(52, 32000, 396), (208, 7871, 396), (7, 130000, 396), (3, 100, 8), (500, 4000, 396), (1, 70, 4)],
)
def test_middle_splits_cover_the_tokens_and_fill_whole_waves(rows, middle_len, slots):
    from leank_hf.kernels.decode import _middle_splits

    tuning = DecodeTuning(block_n=64, min_split_tokens=256, max_waves=4)
    split_tokens, splits = _middle_splits(tuning, rows, middle_len, slots)
    assert split_tokens % 16 == 0
    assert (splits - 1) * split_tokens < middle_len <= splits * split_tokens  # every token, no empty split

    def fill(count: int) -> float:  # share of the slots of the waves used that hold a program
        programs = rows * count
        return programs / (-(-programs // slots) * slots)

    allowed = range(1, max(1, min(middle_len // 256, 4 * slots // rows)) + 1)  # brute force over every count
    assert splits in allowed
    assert fill(splits) >= max(fill(count) for count in allowed) - 0.02


def test_middle_splits_at_batch_8_on_an_h100():
    """8 rows x 6.5 heads keeping channels, 3 x 132 programs held at once: the default tuning fills two waves to at
    least 98 % (one wave would be filled to 92 %, by 7 splits), and nothing is read where nothing is held."""
    from leank_hf.kernels.decode import _middle_splits

    split_tokens, splits = _middle_splits(DecodeTuning(), 52, 32000, 396)
    assert (splits - 1) * split_tokens < 32000 <= splits * split_tokens
    assert 0.98 * 2 * 396 <= 52 * splits <= 2 * 396
    assert _middle_splits(DecodeTuning(), 0, 32000, 396)[1] == 0
    assert _middle_splits(DecodeTuning(), 52, 0, 396)[1] == 0


def test_a_copied_layer_attention_starts_without_launch_state(monkeypatch):
    """Deep-copying a cache copies its layers; their `LeanKAttention` must not carry compiled kernels along. The CPU
    is made a kernel device, so that both run the kernel (the interpreter there) rather than the reference."""
    import copy

    from leank_hf.kernels import LeanKAttention

    monkeypatch.setattr(LeanKAttention, "kernel_devices", ("cuda", "cpu"))
    dtype = KERNEL_DTYPES[-1]
    cache = random_cache(2, 2, 64, 16, 4, 120, 20, dtype, seed=51)
    query = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(52)).to(KERNEL_DEVICE, dtype)
    attention = LeanKAttention()
    attention(query, cache, 0.1)
    assert attention._decoder is not None, "the kernel did not run"
    copied = copy.deepcopy(attention)
    assert copied._decoder is None
    assert_close(copied(query, cache, 0.1), reference(query, cache, 0.1), dtype)
    assert copied._decoder not in (None, attention._decoder)
