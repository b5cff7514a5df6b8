"""Plain-tensor description of one layer's pruned cache, shared by the PyTorch path and the Triton kernels."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .quantization import (
    QuantizedKeys,
    QuantizedValues,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
)

# Tokens written to the middle stores per step of `ChannelLayout.write_middle`.
_WRITE_BLOCK = 1024


@dataclass(frozen=True)
class ChannelLayout:
    """Where each KV head's kept key channels live in a layer's middle-key store.

    A layer's kept channels, head 0's then head 1's and so on, are cut into chunks of `chunk` channels; a head owns
    `kept / chunk` consecutive chunks. Middle keys are stored chunk-major, `[batch, chunks, tokens, chunk]`, so a
    head's keys for a run of tokens are one contiguous stretch of memory per chunk (the kernel reads them in long
    coalesced bursts, never strided by the other heads' channels). Values are stored only for heads that keep at
    least one channel.

    Attributes:
        packed_index: `[C]` long, index of each kept channel into the flattened `(head, channel)` axis, in store order.
        value_heads: `[Hv]` long, the heads that have a middle-value row, in row order.
        chunk_heads: `[C / chunk]` long, the head that owns each chunk.
        lane_heads: `[C]` long, the head of each kept channel, in store order.
        lane_channels: `[C]` long, each kept channel's index within its head, in store order.
        offsets_table: `[H + 1]` int32; head `h` owns kept channels `[offsets_table[h], offsets_table[h + 1])`.
        row_heads_table: `[Hv]` int32, `value_heads` for the kernel: its middle programs exist only for these heads.
        row_offsets_table: `[Hv + 1]` int32; value row `r` owns kept channels `[t[r], t[r + 1])`.
        channel_table: `[Hv, max_kept]` int32, each value row's kept channels, zero-padded.
        value_rows: how many heads have a middle-value row (a host int: the kernel's grid needs no device read).
        chunk: largest power of two (<= 64) dividing every head's kept count.
        max_kept: the largest kept count rounded up to a power of two (at least 16): the kernels' channel width.
    """

    packed_index: torch.Tensor
    value_heads: torch.Tensor
    chunk_heads: torch.Tensor
    lane_heads: torch.Tensor
    lane_channels: torch.Tensor
    offsets_table: torch.Tensor
    row_heads_table: torch.Tensor
    row_offsets_table: torch.Tensor
    channel_table: torch.Tensor
    value_rows: int
    chunk: int
    max_kept: int

    @classmethod
    def from_mask(cls, mask: torch.Tensor, device: torch.device | str | None = None) -> ChannelLayout:
        """Build the layout of a `[kv_heads, head_dim]` boolean keep-mask, with index tensors on `device`."""
        num_heads, head_dim = mask.shape
        mask = mask.bool().cpu()
        counts = mask.sum(1).tolist()
        chunk = 64
        while chunk > 1 and any(count % chunk for count in counts):
            chunk //= 2
        heads, channels = mask.nonzero(as_tuple=True)  # row-major: head 0's channels first
        offsets = [0, *itertools.accumulate(counts)]
        value_heads = [h for h in range(num_heads) if counts[h] > 0]
        max_kept = max(16, 1 << (max(counts, default=1) - 1).bit_length())
        row_offsets = [*(offsets[h] for h in value_heads), offsets[-1]]
        return cls(
            packed_index=(heads * head_dim + channels).to(device),
            value_heads=torch.tensor(value_heads, dtype=torch.long, device=device),
            chunk_heads=heads[::chunk].to(device),
            lane_heads=heads.to(device),
            lane_channels=channels.to(device),
            offsets_table=torch.tensor(offsets, dtype=torch.int32, device=device),
            row_heads_table=torch.tensor(value_heads, dtype=torch.int32, device=device),
            row_offsets_table=torch.tensor(row_offsets, dtype=torch.int32, device=device),
            channel_table=_padded_rows([row for row in channels.split(counts) if len(row)], max_kept).to(device),
            value_rows=len(value_heads),
            chunk=chunk,
            max_kept=max_kept,
        )

    @property
    def packed_channels(self) -> int:
        return self.packed_index.shape[0]

    @property
    def num_chunks(self) -> int:
        return self.chunk_heads.shape[0]

    def middle_key_shape(self, batch: int, tokens: int) -> tuple[int, int, int, int]:
        """Shape of the middle-key store for `tokens` tokens per row."""
        return batch, self.num_chunks, tokens, self.chunk

    def write_middle(
        self, keys: torch.Tensor, values: torch.Tensor, key_store: torch.Tensor, value_store: torch.Tensor
    ) -> None:
        """Write tokens' kept key channels and their values into slices of the middle stores.

        Args:
            keys: `[B, H, n, D]` full keys.
            values: `[B, H, n, D]`.
            key_store: `[B, chunks, n, chunk]` slice of the middle-key store.
            value_store: `[B, Hv, n, D]` slice of the middle-value store.

        In blocks of `_WRITE_BLOCK` tokens, a few operations each whatever the number of heads (a decode step's flush
        is one block), and what a prefill holds beside its own keys is one block's kept keys and values.
        """
        for start in range(0, keys.shape[2], _WRITE_BLOCK):
            block = slice(start, start + _WRITE_BLOCK)
            key_store[:, :, block] = self.pruned_keys(keys[:, :, block])
            value_store[:, :, block] = values[:, self.value_heads, block]

    def pruned_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """The kept channels of keys `[B, H, n, D]`, as the middle-key store holds them: `[B, chunks, n, chunk]`."""
        # Two advanced indices split by a slice put the kept channels first: [C, B, n].
        kept = keys[:, self.lane_heads, :, self.lane_channels]
        return kept.view(self.num_chunks, self.chunk, keys.shape[0], keys.shape[2]).permute(2, 0, 3, 1)


def _padded_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """`[len(rows), width]` int32 with each row's values first, then zeros."""
    table = torch.zeros(len(rows), width, dtype=torch.int32)
    for index, row in enumerate(rows):
        table[index, : len(row)] = row
    return table


class PrunedKV(NamedTuple):
    """One layer's stored LeanK cache as plain tensors (views of live tokens; B batch, H KV heads, D head_dim).

    Tokens of a row are the union of three segments; within each, a flag says which slots hold a real token
    (padding and tokens already counted as another row's sink are not).

    Attributes:
        sink_keys: `[B, H, S, D]` full keys of the first `sink` real tokens of each row.
        sink_values: `[B, H, S, D]`.
        sink_lengths: `[B]` int, slots `[0, len)` of row b's sink are filled.
        middle_keys: `[B, C / chunk, M, chunk]` kept key channels, chunk-major (see `ChannelLayout`).
        middle_values: `[B, Hv, M, D]` values of the heads that keep at least one channel.
        middle_valid: `[B, M]` bool.
        middle_start: `[B]` int, or None. When given, each row's real middle tokens are exactly its slots from
            `middle_start[b]` on (what left padding gives; `middle_valid` says the same), which is all the decode
            kernel reads; None when some row's are not contiguous (only the PyTorch path handles that).
        recent_keys: `[B, H, W, D]` full keys of the recent window.
        recent_values: `[B, H, W, D]`.
        recent_valid: `[B, W]` bool.
        layout: the layer's `ChannelLayout`.
        middle_length: `[]` int on the stores' device, or None. When given, only middle slots `[0, middle_length)`
            are stored tokens (`middle_valid` says the same); the middle tensors are the stores' whole capacity, so
            shapes stay fixed while lengths change on the device (what a CUDA graph needs). None: every slot is.
    """

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    sink_lengths: torch.Tensor
    middle_keys: torch.Tensor
    middle_values: torch.Tensor
    middle_valid: torch.Tensor
    middle_start: torch.Tensor | None
    recent_keys: torch.Tensor
    recent_values: torch.Tensor
    recent_valid: torch.Tensor
    layout: ChannelLayout
    middle_length: torch.Tensor | None = None

    @property
    def middle_len(self) -> int:
        return self.middle_valid.shape[1]


class QuantizedPrunedKV(NamedTuple):
    """One layer's stored LeanK cache with its middle quantized (see `quantization.py`): a `PrunedKV` whose middle keys
    and values are the uint8 codes, and their scales and zeros beside it.

    The codes keep the token axis of the float stores (int4 packs along channels), so whatever slices, reorders or
    grows a middle store along tokens or rows works on them unchanged; the key scales go by blocks of tokens instead.

    Attributes:
        cache: the `PrunedKV`, with `middle_keys` the keys' codes `[B, C / chunk, M, ceil(chunk * bits / 8)]` and
            `middle_values` the values' `[B, Hv, M, ceil(D * bits / 8)]` (`QuantizedKeys.data`,
            `QuantizedValues.data`).
        key_scales: `[B, C / chunk, ceil(M / block_size), chunk]` fp16; block `i` holds middle slots
            `[i * block_size, (i + 1) * block_size)` (each row's own scales: padding never widens them).
        key_zeros: like `key_scales`.
        value_scales: `[B, Hv, M, D / group_size]` fp16.
        value_zeros: like `value_scales`.
        bits: 4 or 8.
        block_size: middle slots per block of key scales.
        group_size: channels per group of value scales.
    """

    cache: PrunedKV
    key_scales: torch.Tensor
    key_zeros: torch.Tensor
    value_scales: torch.Tensor
    value_zeros: torch.Tensor
    bits: int
    block_size: int
    group_size: int

    @classmethod
    def quantize(cls, cache: PrunedKV, bits: int, block_size: int, group_size: int) -> QuantizedPrunedKV:
        """`cache` with its middle quantized; its padding slots (`middle_valid` False) never widen a range."""
        valid = cache.middle_valid[:, None, :]
        keys = quantize_keys(cache.middle_keys, bits, block_size, valid)
        values = quantize_values(cache.middle_values, bits, group_size, valid)
        codes = cache._replace(middle_keys=keys.data, middle_values=values.data)
        return cls(codes, keys.scales, keys.zeros, values.scales, values.zeros, bits, block_size, group_size)

    @property
    def middle_keys(self) -> QuantizedKeys:
        return QuantizedKeys(self.cache.middle_keys, self.key_scales, self.key_zeros, self.bits, self.block_size)

    @property
    def middle_values(self) -> QuantizedValues:
        return QuantizedValues(
            self.cache.middle_values, self.value_scales, self.value_zeros, self.bits, self.group_size
        )

    def dequantized(self) -> PrunedKV:
        """The `PrunedKV` this cache stands for, its middle in fp32 (a copy: for the reference and tests only)."""
        keys, values = dequantize_keys(self.middle_keys), dequantize_values(self.middle_values)
        return self.cache._replace(middle_keys=keys, middle_values=values)


class NewTokens(NamedTuple):
    """This step's keys and values, handed to attention before they are stored.

    The cache given with them has window slots for them (its last `Q`), not yet written: attention writes the tokens
    there, with their flags, and attends over the window including them. The decode kernel does the write itself, so
    eager decoding spends no launches per layer on it.

    Attributes:
        keys: `[B, H, Q, D]`.
        values: `[B, H, Q, D]`.
        valid: `[B, Q]` bool, False for padding; None when every token is real.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor | None

    def write(self, cache: PrunedKV | QuantizedPrunedKV) -> None:
        """Write the tokens into the last `Q` window slots of `cache` (what the kernel does as it attends); a quantized
        cache's window is its `PrunedKV`'s, at full width like any window."""
        if isinstance(cache, QuantizedPrunedKV):
            cache = cache.cache
        count = self.keys.shape[2]
        window = cache.recent_keys.shape[2]
        cache.recent_keys.narrow(2, window - count, count).copy_(self.keys)
        cache.recent_values.narrow(2, window - count, count).copy_(self.values)
        flags = cache.recent_valid.narrow(1, window - count, count)
        if self.valid is None:
            flags.fill_(True)
        else:
            flags.copy_(self.valid)
