"""LeanKLayer + the LeanK attention function against the dense definition, across many flush boundaries."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from leank_hf.cache.layer import LeanKLayer
from leank_hf.cache.stores import GrowableStore
from leank_hf.kernels import LeanKAttention
from leank_hf.kernels import layout as layout_module

from .dense_reference import window_sizes
from .helpers import drive_layer, random_mask, storage_bytes, tensors_held
from .tolerances import assert_close

CASES = [
    # (sink, recent, block, steps, left padding per row, q heads, kv heads, head_dim, align)
    pytest.param(4, 8, 4, [20] + [1] * 30, [0], 4, 2, 32, 8, id="bs1-gqa2"),
    pytest.param(4, 8, 4, [21] + [1] * 25, [0, 3, 9], 8, 2, 32, 8, id="left-pad-longer-than-sink"),
    pytest.param(3, 5, 3, [7, 1, 1, 4, 1, 1, 9, 1, 1, 1], [2, 0], 3, 3, 48, 16, id="multi-token-steps-mha"),
    pytest.param(0, 6, 2, [13] + [1] * 12, [0, 5], 8, 1, 16, 16, id="no-sink-mqa"),
    pytest.param(4, 0, 3, [10] + [1] * 10, [1, 0], 4, 2, 32, 8, id="no-recent"),
    pytest.param(8, 16, 8, [5] + [1] * 30, [0, 2], 4, 2, 32, 8, id="short-prompt-fills-sink-while-decoding"),
]


@pytest.mark.parametrize(("sink", "recent", "block", "steps", "pads", "hq", "h", "d", "align"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skip_causal_mask", [True, False], ids=["masks-as-generate", "masks-always"])
def test_layer_attention_matches_dense_definition(
    sink, recent, block, steps, pads, hq, h, d, align, dtype, skip_causal_mask
):  # fmt: skip
    generator = torch.Generator().manual_seed(hash((sink, recent, block, len(steps), hq, d)) % 2**31)
    mask = random_mask(h, d, align, generator, prune_head=0 if h > 1 else None)
    layer = LeanKLayer(mask, sink=sink, recent=recent, block_size=block)
    drive = drive_layer(layer, steps, pads, hq, d, dtype, generator, skip_causal_mask=skip_causal_mask)
    for _, output, expected, query_valid in drive:
        # Padding queries have no defined output; compare real ones.
        rows = query_valid[:, None, :].expand(-1, hq, -1)
        assert_close(output[rows], expected[rows], dtype)


KERNEL_CASES = [
    # (sink, recent, block, steps, left padding per row, q heads, kv heads, head_dim): kept counts in multiples of 16
    pytest.param(4, 8, 4, [20] + [1] * 30, [0], 4, 2, 32, id="bs1-gqa2"),
    pytest.param(4, 8, 4, [21] + [1] * 25, [0, 3, 9], 8, 2, 32, id="left-pad-longer-than-sink"),
    pytest.param(3, 5, 3, [7, 1, 1, 4, 1, 1, 9, 1, 1, 1], [2, 0], 4, 2, 32, id="multi-token-steps-between"),
    pytest.param(8, 16, 8, [5] + [1] * 30, [0, 2], 4, 2, 32, id="short-prompt-fills-sink-while-decoding"),
    pytest.param(0, 6, 2, [13] + [1] * 12, [0, 5], 8, 1, 16, id="no-sink-mqa"),
]


@pytest.mark.parametrize(("sink", "recent", "block", "steps", "pads", "hq", "h", "d"), KERNEL_CASES)
def test_layer_attention_through_the_decode_kernel_matches_dense_definition(
    sink, recent, block, steps, pads, hq, h, d, monkeypatch, decoder_calls
):  # fmt: skip
    """One-token steps go through the Triton decode kernel (Triton's interpreter on the CPU), which writes the step's
    token into the window itself and is told by the layer's stores version when to read the stores again. Then a
    beam reorder, and more steps."""
    monkeypatch.setattr(LeanKAttention, "kernel_devices", ("cuda", "cpu"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16  # the interpreter emulates bf16 wrongly (see test_triton_decode)
    generator = torch.Generator().manual_seed(hash((sink, recent, block, len(steps), hq, d)) % 2**31)
    layer = LeanKLayer(random_mask(h, d, 16, generator, prune_head=0 if h > 1 else None), sink, recent, block)
    for _, output, expected, query_valid in drive_layer(layer, steps, pads, hq, d, dtype, generator, device):
        rows = query_valid[:, None, :].expand(-1, hq, -1)
        assert_close(output[rows], expected[rows], dtype)
    assert len(decoder_calls) == sum(n == 1 for n in steps[1:])
    # A beam reorder, then one more step: the same as the step on the rows before the reorder, reordered.
    original = copy.deepcopy(layer)
    original.attention.kernel_devices = ()  # the PyTorch path
    order = torch.arange(len(pads) - 1, -1, -1, device=device)
    layer.reorder_cache(order)
    query = torch.randn(len(pads), hq, 1, d, generator=generator).to(device, dtype)
    keys, values = (torch.randn(len(pads), h, 1, d, generator=generator).to(device, dtype) for _ in "kv")
    step, _ = original.update(keys, values)
    expected = original.attend(query, step, None, d**-0.5)
    step, _ = layer.update(keys[order], values[order])
    assert_close(layer.attend(query[order], step, None, d**-0.5), expected[order], dtype)
    assert len(decoder_calls) == sum(n == 1 for n in steps[1:]) + 1


def test_decode_flushes_without_padding_read_nothing_back_from_the_gpu(monkeypatch):
    """Once every row's sink is full, tokens stored without padding flags all go to the middle: the flush decides on
    the host, reading nothing back from the GPU; with padding every flush does. Outputs match the dense definition
    either way."""
    reads, flushing = [], []
    settle = GrowableStore.settle

    def counted(name):  # every way of reading a tensor's values on the host, counted inside `settle` (the flush)
        method = getattr(torch.Tensor, name)

        def read(tensor, *args):
            if flushing:
                reads.append(name)
            return method(tensor, *args)

        return read

    def settle_counted(store):
        flushing.append(store)
        try:
            return settle(store)
        finally:
            flushing.pop()

    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    monkeypatch.setattr(GrowableStore, "settle", settle_counted)
    generator = torch.Generator().manual_seed(9)
    for pads, decode_flushes_reading in (([0, 0], 0), ([0, 3], 7)):  # 28 steps, a flush every 4
        layer = LeanKLayer(random_mask(2, 32, 8, generator), sink=4, recent=8, block_size=4)
        for step, output, expected, query_valid in drive_layer(layer, [20] + [1] * 28, pads, 4, 32, torch.float32,
                                                               generator):  # fmt: skip
            rows = query_valid[:, None, :].expand(-1, 4, -1)
            assert_close(output[rows], expected[rows], torch.float32)
            if step == 0:
                reads.clear()  # the prefill's
        assert len(reads) == decode_flushes_reading, pads


def test_fully_pruned_head_drops_middle_tokens_and_their_values():
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[1, :8] = True  # head 0 keeps nothing, head 1 keeps 8 channels
    layer = LeanKLayer(mask, sink=2, recent=4, block_size=2)
    for _ in drive_layer(layer, [30] + [1] * 6, [0], 2, 16, torch.float32, generator):
        pass
    view = layer.view()
    assert view.middle_values.shape[1] == 1, "only the head that keeps channels stores middle values"
    chunks, chunk = view.middle_keys.shape[1], view.middle_keys.shape[3]
    assert chunks * chunk == 8, "middle keys hold only the kept channels"


@pytest.mark.parametrize("write_block", [1024, 2])
def test_middle_store_holds_only_kept_channels_and_no_full_keys(write_block, monkeypatch):
    monkeypatch.setattr(layout_module, "_WRITE_BLOCK", write_block)
    generator = torch.Generator().manual_seed(1)
    mask = random_mask(4, 64, 16, generator)
    layer = LeanKLayer(mask, sink=4, recent=16, block_size=8)
    for _ in drive_layer(layer, [200] + [1] * 40, [0, 7], 8, 64, torch.float32, generator):
        pass
    view = layer.view()
    kept_total = int(mask.sum())
    for keys in (view.middle_keys, layer.store.flushed.middle.keys):
        assert keys.shape[1] * keys.shape[3] == kept_total
    # Each stored chunk equals the kept channels of its head's full keys (chunk-major store).
    layout, full = layer.layout, torch.randn(2, 4, 5, 64, generator=generator)
    key_store = torch.full(layout.middle_key_shape(2, 5), torch.nan)
    value_store = torch.full((2, len(layout.value_heads), 5, 64), torch.nan)
    layout.write_middle(full, full + 1, key_store, value_store)
    chunk_channels = layout.lane_channels.view(-1, layout.chunk)
    for index, (head, channels) in enumerate(zip(layout.chunk_heads.tolist(), chunk_channels, strict=True)):
        torch.testing.assert_close(key_store[:, index], full[:, head][..., channels])
    torch.testing.assert_close(value_store, full[:, layout.value_heads] + 1)
    assert view.recent_keys.shape[2] <= 16 + 8 - 1
    assert view.sink_keys.shape[2] <= 4


def test_memory_report_equals_tensors_held():
    generator = torch.Generator().manual_seed(2)
    mask = random_mask(2, 32, 8, generator)
    sink, recent, block, steps, rows, heads, head_dim = 4, 8, 4, [100] + [1] * 37, 2, 2, 32
    layer = LeanKLayer(mask, sink=sink, recent=recent, block_size=block)
    for _ in drive_layer(layer, steps, [0, 5], 4, head_dim, torch.bfloat16, generator):
        pass
    report = layer.memory(0)
    held = tensors_held(layer)
    assert report.key_bytes == storage_bytes(held["keys"])
    assert report.value_bytes == storage_bytes(held["values"])
    assert report.other_bytes == storage_bytes(held["other"])
    # What the definition holds (bf16, 2 bytes): every row's `sink` real tokens and the window at full width, the
    # tokens between them (padding included: rows are stored side by side) on the kept channels, their values for
    # the heads that keep one; a flag per middle and window token, a sink length and a middle start per row.
    tokens, window = sum(steps), window_sizes([*steps, 0], recent, block)[-1]
    middle = tokens - sink - window
    kept, value_heads = int(mask.sum()), int(mask.any(-1).sum())
    in_use = rows * (
        2 * (2 * heads * head_dim * (sink + window) + kept * middle + value_heads * head_dim * middle)
        + middle + window + 2 * 8
    )  # fmt: skip
    assert report.total_bytes - report.reserved_bytes == in_use
    # The stock layer, given the same steps, holds what `dense_bytes` says.
    dynamic = DynamicLayer()
    for n in steps:
        dynamic.update(*(torch.zeros(rows, heads, n, head_dim, dtype=torch.bfloat16) for _ in "kv"))
    assert report.dense_bytes == storage_bytes([dynamic.keys]) + storage_bytes([dynamic.values])


def test_growth_is_amortised_and_reserved_capacity_small():
    generator = torch.Generator().manual_seed(3)
    mask = random_mask(2, 32, 8, generator)
    layer = LeanKLayer(mask, sink=4, recent=32, block_size=16)
    reallocations, pointer = 0, None
    for _ in drive_layer(layer, [1000] + [1] * 1500, [0], 2, 32, torch.float32, generator):
        if layer.store.flushed.middle.keys.data_ptr() != pointer:
            reallocations += 1
            pointer = layer.store.flushed.middle.keys.data_ptr()
    # 1000 -> 2500 tokens with ~6 % growth per reallocation: about log(2.5) / log(1.0625) ~ 15, not one per block.
    assert reallocations <= 20
    report = layer.memory(0)
    assert report.reserved_bytes <= 0.10 * report.total_bytes


def test_prefill_stores_the_window_without_decode_room_and_decoding_adds_it_once():
    """The prefill is a generate call's memory peak: no store may hold room only decoding uses yet."""
    generator = torch.Generator().manual_seed(8)
    mask = random_mask(2, 32, 8, generator)
    layer = LeanKLayer(mask, sink=4, recent=32, block_size=16)
    pointers = set()
    for index, _ in enumerate(drive_layer(layer, [200] + [1] * 40, [0, 3], 4, 32, torch.float32, generator)):
        window = layer.store.window
        if index == 0:
            kept = 32 + (200 - 32) % 16  # `recent`, and the tokens short of a whole block that stay with them
            assert window.keys.shape[2] == window.values.shape[2] == window.valid.shape[1] == kept
        else:
            assert window.keys.shape[2] == 32 + 16  # recent + block_size: what the window holds between steps
            pointers.add(window.keys.data_ptr())
    assert len(pointers) == 1  # added at the first decode step, then kept


def test_crop_rolls_back_window_tokens_and_refuses_pruned_ones():
    generator = torch.Generator().manual_seed(4)
    mask = random_mask(2, 32, 8, generator)
    layer = LeanKLayer(mask, sink=4, recent=8, block_size=4)
    for _ in drive_layer(layer, [30, 1, 1], [0], 2, 32, torch.float32, generator):
        pass
    assert layer.get_seq_length() == 32
    window = layer.view().recent_keys.shape[2]
    layer.crop(-3)
    assert layer.get_seq_length() == 29
    layer.crop(torch.tensor(-1))  # as transformers 5.17's assisted decoding passes it
    assert layer.get_seq_length() == 28 and type(layer.get_seq_length()) is int
    assert layer.view().recent_keys.shape[2] == window - 4
    with pytest.raises(ValueError, match="recent window"):
        layer.crop(-50)
    with pytest.raises(ValueError, match="negative"):
        layer.crop(5)


def test_batch_reorder_select_and_repeat_follow_rows():
    generator = torch.Generator().manual_seed(5)
    mask = random_mask(2, 32, 8, generator)
    layer = LeanKLayer(mask, sink=4, recent=8, block_size=4)
    for _ in drive_layer(layer, [40, 1], [0, 6, 2], 2, 32, torch.float32, generator):
        pass
    before = layer.view()
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    after = layer.view()
    torch.testing.assert_close(after.middle_keys, before.middle_keys[[2, 0, 1]])
    torch.testing.assert_close(after.sink_lengths, before.sink_lengths[[2, 0, 1]])
    layer.batch_repeat_interleave(2)
    assert layer.batch_size == 6
    torch.testing.assert_close(layer.view().middle_valid[1], after.middle_valid[0])  # the window has no padding
    layer.batch_select_indices(torch.tensor([1, 4]))
    assert layer.batch_size == 2
    torch.testing.assert_close(layer.view().middle_valid[1], after.middle_valid[2])


def test_middle_start_is_where_each_rows_real_middle_tokens_begin():
    generator = torch.Generator().manual_seed(7)
    layer = LeanKLayer(random_mask(2, 32, 8, generator), sink=4, recent=8, block_size=4)
    checked = 0
    for _ in drive_layer(layer, [40, 3] + [1] * 9, [0, 13, 30], 4, 32, torch.float32, generator):
        view = layer.view()
        if view.middle_len:
            slots = torch.arange(view.middle_len)
            assert torch.equal(view.middle_valid, slots >= view.middle_start[:, None])
            checked += 1
    assert checked and int(layer.view().middle_start.max()) > 0, "left padding made ragged starts"


def test_real_middle_tokens_with_a_gap_leave_middle_start_unset():
    """Padding after a row's real tokens (e.g. right padding) leaves a gap only the PyTorch path handles."""
    layer = LeanKLayer(torch.ones(2, 16, dtype=torch.bool), sink=1, recent=2, block_size=1)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, 5:8] = False
    step, _ = layer.update(torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16))
    layer.commit(step, valid)
    assert layer.view().middle_start is None
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.view().middle_start is None, "the gap stays known"


def test_reused_with_other_batch_size_raises():
    layer = LeanKLayer(torch.ones(2, 16, dtype=torch.bool), sink=1, recent=2, block_size=1)
    step, _ = layer.update(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16))
    layer.commit(step, None)
    with pytest.raises(ValueError, match="another batch size"):
        layer.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16))


def test_mask_for_other_geometry_raises():
    layer = LeanKLayer(torch.ones(2, 16, dtype=torch.bool), sink=1, recent=2, block_size=1)
    with pytest.raises(ValueError, match="KV heads"):
        layer.update(torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16))


def test_pending_step_used_by_other_attention_explains_fix():
    layer = LeanKLayer(torch.ones(2, 16, dtype=torch.bool), sink=1, recent=2, block_size=1)
    step, _ = layer.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    with pytest.raises(AttributeError, match="attn_implementation must be 'leank'"):
        _ = step.shape


@pytest.mark.parametrize("score_budget", [1, 700])
def test_multi_token_steps_in_query_blocks_match_dense_definition(monkeypatch, score_budget):
    """Chunked-prefill-like steps with the reference path's score budget forcing one or a few queries per block."""
    monkeypatch.setattr("leank_hf.kernels.reference._SCORE_ELEMENTS", score_budget)
    generator = torch.Generator().manual_seed(11)
    mask = random_mask(2, 32, 8, generator)
    layer = LeanKLayer(mask, sink=3, recent=6, block_size=3)
    for _, output, expected, query_valid in drive_layer(layer, [9, 7, 5, 8, 1, 1], [2, 0], 4, 32, torch.float32,
                                                         generator):  # fmt: skip
        rows = query_valid[:, None, :].expand(-1, 4, -1)
        assert_close(output[rows], expected[rows], torch.float32)
