"""Plain-tensor description of one layer's pruned cache, shared by the PyTorch path and the Triton kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class ChannelLayout:
    """Where each KV head's kept key channels live in a layer's packed middle-key store.

    The middle keys of all heads of a layer are stored as one `[batch, tokens, C]` tensor whose columns are the kept
    channels of head 0, then head 1, ...; `C` is the layer's total kept count. Values are stored only for heads that
    keep at least one channel.

    Attributes:
        packed_index: `[C]` long, index of each packed column into the flattened `(head, channel)` axis.
        value_heads: `[Hv]` long, the heads that have a middle-value row, in row order.
        kept_flat: `[C]` int32, channel index (within its head) of each packed column.
        offsets_table: `[H + 1]` int32; head `h` owns packed columns `[offsets_table[h], offsets_table[h + 1])`.
        value_rows_table: `[H]` int32, each head's row in the middle-value store, or -1 for a head that keeps nothing.
        own_columns: `[H, C]` bool, True where a packed column belongs to that head (the PyTorch path scores every
            head in one matmul with it).
        chunk: largest power of two (<= 64) dividing every head's kept count: the kernels' channel tile.
        max_kept: the largest kept count rounded up to a power of two (at least 16): the kernels' channel width.
    """

    packed_index: torch.Tensor
    value_heads: torch.Tensor
    kept_flat: torch.Tensor
    offsets_table: torch.Tensor
    value_rows_table: torch.Tensor
    own_columns: torch.Tensor
    chunk: int
    max_kept: int

    @classmethod
    def from_mask(cls, mask: torch.Tensor, device: torch.device | str | None = None) -> ChannelLayout:
        """Build the layout of a `[kv_heads, head_dim]` boolean keep-mask, with index tensors on `device`."""
        num_heads, head_dim = mask.shape
        kept = tuple(mask[h].nonzero().flatten().to(device) for h in range(num_heads))
        counts = [len(k) for k in kept]
        offsets = tuple(int(sum(counts[:h])) for h in range(num_heads + 1))
        value_heads = [h for h in range(num_heads) if counts[h] > 0]
        value_rows = tuple(value_heads.index(h) if counts[h] > 0 else -1 for h in range(num_heads))
        packed_index = torch.cat([k + h * head_dim for h, k in enumerate(kept)]) if kept else torch.empty(0)
        column_heads = torch.repeat_interleave(torch.arange(num_heads), torch.tensor(counts, dtype=torch.long))
        chunk = 64
        while chunk > 1 and any(count % chunk for count in counts):
            chunk //= 2
        return cls(
            packed_index=packed_index.long().to(device),
            value_heads=torch.tensor(value_heads, dtype=torch.long, device=device),
            kept_flat=torch.cat(kept).to(device=device, dtype=torch.int32)
            if kept
            else torch.empty(0, dtype=torch.int32),
            offsets_table=torch.tensor(offsets, dtype=torch.int32, device=device),
            value_rows_table=torch.tensor(value_rows, dtype=torch.int32, device=device),
            own_columns=(torch.arange(num_heads)[:, None] == column_heads[None]).to(device),
            chunk=chunk,
            max_kept=max(16, 1 << (max(counts, default=1) - 1).bit_length()),
        )

    @property
    def num_heads(self) -> int:
        return self.own_columns.shape[0]

    @property
    def packed_channels(self) -> int:
        return self.own_columns.shape[1]

    def pack_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """`[B, H, n, D]` full keys → `[B, n, C]` kept channels packed by head."""
        batch, heads, tokens, head_dim = keys.shape
        flat = keys.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        return flat.index_select(-1, self.packed_index)

    def select_values(self, values: torch.Tensor) -> torch.Tensor:
        """`[B, H, n, D]` values → `[B, Hv, n, D]` of the heads that keep at least one channel."""
        return values.index_select(1, self.value_heads)


class PrunedKV(NamedTuple):
    """One layer's stored LeanK cache as plain tensors (views of live tokens; B batch, H KV heads, D head_dim).

    Tokens of a row are the union of three segments; within each, a flag says which slots hold a real token
    (padding and tokens already counted as another row's sink are not).

    Attributes:
        sink_keys: `[B, H, S, D]` full keys of the first `sink` real tokens of each row.
        sink_values: `[B, H, S, D]`.
        sink_lengths: `[B]` int, slots `[0, len)` of row b's sink are filled.
        middle_keys: `[B, M, C]` kept key channels, packed by head (see `ChannelLayout`).
        middle_values: `[B, Hv, M, D]` values of the heads that keep at least one channel.
        middle_valid: `[B, M]` bool.
        recent_keys: `[B, H, W, D]` full keys of the recent window.
        recent_values: `[B, H, W, D]`.
        recent_valid: `[B, W]` bool.
        layout: the layer's `ChannelLayout`.
    """

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    sink_lengths: torch.Tensor
    middle_keys: torch.Tensor
    middle_values: torch.Tensor
    middle_valid: torch.Tensor
    recent_keys: torch.Tensor
    recent_values: torch.Tensor
    recent_valid: torch.Tensor
    layout: ChannelLayout
