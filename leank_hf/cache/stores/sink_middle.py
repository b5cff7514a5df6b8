"""`SinkAndMiddle`: where tokens go when they leave the recent window, each row's first `sink` real tokens at full
width and the others on their kept key channels only."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...kernels import ChannelLayout
from ...memory import held_bytes
from .buffers import GROWTH_FRACTION, grown, live_bytes


class SinkAndMiddle:
    """A growable store's sink and pruned middle (the tensors are those of `PrunedKV`).

    The sink grows as rows fill it, to at most `sink` slots. The middle stores grow by `GROWTH_FRACTION` of their
    size, or by what the layer's pruning saves if that is less, so that their reserve never costs more than pruning
    saved. Nothing is stored in the middle when every head prunes every channel: nothing would ever read it.
    """

    def __init__(self, sink: int, layout: ChannelLayout, like: torch.Tensor) -> None:
        batch, heads, _, head_dim = like.shape
        self.sink, self.layout = sink, layout
        self.growth = _middle_growth(layout, heads, head_dim)
        device = like.device
        self.sink_keys = like.new_zeros(batch, heads, 0, head_dim)
        self.sink_values = like.new_zeros(batch, heads, 0, head_dim)
        self.sink_lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.sink_slots = 0  # filled slots of the fullest row's sink
        self.sinks_full = sink == 0  # every row's sink holds `sink` tokens (known on the host)
        self.middle_keys = like.new_empty(layout.middle_key_shape(batch, 0))
        self.middle_values = like.new_empty(batch, len(layout.value_heads), 0, head_dim)
        self.middle_valid = torch.empty(batch, 0, dtype=torch.bool, device=device)
        self.middle_start = torch.zeros(batch, dtype=torch.long, device=device)
        self.middle_columns = 0  # stored middle columns
        self.middle_has_holes = False  # some row's real middle tokens are not contiguous

    def add(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Store tokens `[B, H, n, D]` that left the window: a row's first `sink` real tokens to its sink, the others to
        the middle. `valid` `[B, n]`; None when every token is real."""
        if valid is None and self.sinks_full:
            # What decoding does every `block_size` steps: every token goes to the middle, known on the host. (The
            # general path below reads its decisions back from the GPU, which stalls the host once per layer.)
            self._append_middle(keys, values, None)
            return
        if valid is None:
            valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)
        rank = self.sink_lengths.unsqueeze(1) + valid.long().cumsum(1) - 1  # real-token rank within the row
        to_sink = valid & (rank < self.sink)
        to_middle = valid & ~to_sink
        has_middle = to_middle.any(0)
        sink_lengths = self.sink_lengths + to_sink.sum(1)
        # One device-to-host read for the decisions below.
        decisions = (
            to_sink.any(), has_middle.any(), has_middle.long().argmax(), self._makes_hole(to_middle),
            sink_lengths.max(), sink_lengths.min() >= self.sink,
        )  # fmt: skip
        any_sink, any_middle, first, hole, sink_slots, sinks_full = torch.stack([d.long() for d in decisions]).tolist()
        self.sinks_full = bool(sinks_full)
        if self.sink and any_sink:
            self._grow_sink(sink_slots)
            rows, cols = to_sink.nonzero(as_tuple=True)
            slots = rank[rows, cols]
            self.sink_keys[rows, :, slots] = keys[rows, :, cols]
            self.sink_values[rows, :, slots] = values[rows, :, cols]
            self.sink_lengths = sink_lengths
            self.sink_slots = sink_slots
        if not any_middle:
            return
        # Leading columns that are sink or padding in every row are not stored.
        start = self.middle_columns
        self._append_middle(keys[:, :, first:], values[:, :, first:], to_middle[:, first:])
        leading_invalid = (~to_middle[:, first:]).long().cumprod(1).sum(1)
        self.middle_start = torch.where(self.middle_start == start, start + leading_invalid, self.middle_start)
        self.middle_has_holes = self.middle_has_holes or bool(hole)

    def _grow_sink(self, slots: int) -> None:
        """Room for `slots` sink tokens per row (as many as the fullest row holds, never more than `sink`)."""
        held = self.sink_keys.shape[2]
        if slots <= held:
            return
        # Zeros, not empty: rows with fewer sink tokens than others read unfilled slots (with zero weight).
        new_slots = torch.arange(held, slots, device=self.sink_keys.device)
        self.sink_keys = grown(self.sink_keys, 2, held, slots).index_fill_(2, new_slots, 0)
        self.sink_values = grown(self.sink_values, 2, held, slots).index_fill_(2, new_slots, 0)

    def _append_middle(self, keys: torch.Tensor, values: torch.Tensor, to_middle: torch.Tensor | None) -> None:
        """Store tokens `[B, H, n, D]` at the end of the middle stores; `to_middle` `[B, n]` flags the real ones (None:
        all)."""
        if self.layout.packed_channels == 0:
            return
        start, end = self.middle_columns, self.middle_columns + keys.shape[2]
        held = self.middle_keys.shape[2]
        capacity = end if end <= held else max(end, held + int(held * self.growth))
        self.middle_keys = grown(self.middle_keys, 2, start, capacity)
        self.middle_values = grown(self.middle_values, 2, start, capacity)
        self.middle_valid = grown(self.middle_valid, 1, start, capacity)
        self.layout.write_middle(keys, values, self.middle_keys[:, :, start:end], self.middle_values[:, :, start:end])
        flags = self.middle_valid.narrow(1, start, end - start)
        if to_middle is None:
            flags.fill_(True)
        else:
            flags.copy_(to_middle)
        self.middle_columns = end

    def _makes_hole(self, to_middle: torch.Tensor) -> torch.Tensor:
        """Whether appending `to_middle` `[B, n]` would leave some row's real middle tokens non-contiguous (a
        non-real slot after a real one). Left padding never does; then each row's real middle tokens are exactly
        the slots from `middle_start` on, which is all the decode kernel reads (conservative: may say True when
        the slots in question are not stored)."""
        real_before = (self.middle_start < self.middle_columns)[:, None]
        after_real = real_before | to_middle.long().cummax(1).values.bool()
        return (after_real & ~to_middle).any()

    def view(self) -> tuple[torch.Tensor, ...]:
        """The first seven fields of `PrunedKV` (live slices, no copies)."""
        sink, middle = self.sink_slots, self.middle_columns
        return (
            self.sink_keys.narrow(2, 0, sink), self.sink_values.narrow(2, 0, sink), self.sink_lengths,
            self.middle_keys.narrow(2, 0, middle), self.middle_values.narrow(2, 0, middle),
            self.middle_valid.narrow(1, 0, middle), None if self.middle_has_holes else self.middle_start,
        )  # fmt: skip

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-axis transform (beam reorder, repeat, select) to every tensor."""
        for name in ("sink_keys", "sink_values", "sink_lengths", "middle_keys", "middle_values", "middle_valid",
                     "middle_start"):  # fmt: skip
            setattr(self, name, fn(getattr(self, name)))
        self.sink_slots = int(self.sink_lengths.max()) if self.sink_lengths.shape[0] else 0

    def bytes_held(self) -> tuple[int, int, int]:
        """Allocated bytes of keys, values and the rest (sink lengths, middle flags and starts)."""
        return (
            held_bytes(self.sink_keys, self.middle_keys),
            held_bytes(self.sink_values, self.middle_values),
            held_bytes(self.sink_lengths, self.middle_valid, self.middle_start),
        )

    def bytes_in_use(self) -> int:
        """Bytes of the slots that hold tokens."""
        return (
            live_bytes(self.sink_keys, 2, self.sink_slots) * 2
            + live_bytes(self.middle_keys, 2, self.middle_columns)
            + live_bytes(self.middle_values, 2, self.middle_columns)
            + live_bytes(self.middle_valid, 1, self.middle_columns)
            + held_bytes(self.sink_lengths, self.middle_start)
        )


def _middle_growth(layout: ChannelLayout, heads: int, head_dim: int) -> float:
    """Share of its size by which a middle store grows: `GROWTH_FRACTION`, or less when a token's pruned keys and
    values save less than that against its full ones, so that the reserve never costs more than the pruning saved."""
    middle = layout.packed_channels + layout.value_rows * head_dim  # per token, in elements
    full = 2 * heads * head_dim
    return min(GROWTH_FRACTION, (full - middle) / middle) if middle else 0.0
