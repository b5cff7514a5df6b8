"""`SinkAndMiddle`: where tokens go when they leave the recent window, each row's first `sink` real tokens at full
width and the others to the middle (`middle.py`), on their kept key channels only."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...memory import held_bytes
from .buffers import grown, live_bytes
from .middle import Middle, Wrap


class SinkAndMiddle:
    """A growable store's sink and its middle (a `Middle`: `PrunedMiddle` or `QuantizedMiddle`), with each row's
    bookkeeping: how full its sink is and where its real middle tokens start.

    The sink grows as rows fill it, to at most `sink` slots.
    """

    def __init__(self, sink: int, middle: Middle, like: torch.Tensor) -> None:
        batch, heads, _, head_dim = like.shape
        self.sink, self.middle = sink, middle
        device = like.device
        self.sink_keys = like.new_zeros(batch, heads, 0, head_dim)
        self.sink_values = like.new_zeros(batch, heads, 0, head_dim)
        self.sink_lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.sink_slots = 0  # filled slots of the fullest row's sink
        self.sinks_full = sink == 0  # every row's sink holds `sink` tokens (known on the host)
        self.middle_start = torch.zeros(batch, dtype=torch.long, device=device)
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
        # Leading columns that are sink or padding in every row are not stored, before the first middle tokens (later,
        # tokens leave the window in whole blocks, which a quantized middle's key blocks line up with).
        first = first if self.middle.columns == 0 else 0
        self._append_middle(keys[:, :, first:], values[:, :, first:], to_middle[:, first:])
        self.middle_has_holes = self.middle_has_holes or bool(hole)

    def _append_middle(self, keys: torch.Tensor, values: torch.Tensor, to_middle: torch.Tensor | None) -> None:
        """Append tokens `[B, H, n, D]` to the middle (`to_middle` `[B, n]`: the real ones, None: all); rows with no
        real middle token yet start theirs at the first real one."""
        before = self.middle.columns
        start = self.middle.append(keys, values, to_middle)
        if to_middle is None and start == before:
            return  # decoding's flushes: rows without middle tokens yet start at `before` already
        leading_invalid = 0 if to_middle is None else (~to_middle).long().cumprod(1).sum(1)
        self.middle_start = torch.where(self.middle_start == before, start + leading_invalid, self.middle_start)

    def _grow_sink(self, slots: int) -> None:
        """Room for `slots` sink tokens per row (as many as the fullest row holds, never more than `sink`)."""
        held = self.sink_keys.shape[2]
        if slots <= held:
            return
        # Zeros, not empty: rows with fewer sink tokens than others read unfilled slots (with zero weight).
        new_slots = torch.arange(held, slots, device=self.sink_keys.device)
        self.sink_keys = grown(self.sink_keys, 2, held, slots).index_fill_(2, new_slots, 0)
        self.sink_values = grown(self.sink_values, 2, held, slots).index_fill_(2, new_slots, 0)

    def _makes_hole(self, to_middle: torch.Tensor) -> torch.Tensor:
        """Whether appending `to_middle` `[B, n]` would leave some row's real middle tokens non-contiguous (a
        non-real slot after a real one). Left padding never does; then each row's real middle tokens are exactly
        the slots from `middle_start` on, which is all the decode kernel reads (conservative: may say True when
        the slots in question are not stored)."""
        real_before = (self.middle_start < self.middle.columns)[:, None]
        after_real = real_before | to_middle.long().cummax(1).values.bool()
        return (after_real & ~to_middle).any()

    def view(self) -> tuple[tuple[torch.Tensor, ...], Wrap]:
        """The first seven fields of `PrunedKV` (live slices, no copies), and the middle's `Wrap`."""
        sink = self.sink_slots
        middle_keys, middle_values, middle_valid, wrap = self.middle.view()
        fields = (
            self.sink_keys.narrow(2, 0, sink), self.sink_values.narrow(2, 0, sink), self.sink_lengths, middle_keys,
            middle_values, middle_valid, None if self.middle_has_holes else self.middle_start,
        )  # fmt: skip
        return fields, wrap

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-axis transform (beam reorder, repeat, select) to every tensor."""
        for name in ("sink_keys", "sink_values", "sink_lengths", "middle_start"):
            setattr(self, name, fn(getattr(self, name)))
        self.middle.map_batch(fn)
        self.sink_slots = int(self.sink_lengths.max()) if self.sink_lengths.shape[0] else 0

    def bytes_held(self) -> tuple[int, int, int]:
        """Allocated bytes of keys, values and the rest (sink lengths, middle flags and starts)."""
        middle_keys, middle_values, middle_other = self.middle.bytes_held()
        return (
            held_bytes(self.sink_keys) + middle_keys,
            held_bytes(self.sink_values) + middle_values,
            held_bytes(self.sink_lengths, self.middle_start) + middle_other,
        )

    def bytes_in_use(self) -> int:
        """Bytes of the slots that hold tokens."""
        sink = live_bytes(self.sink_keys, 2, self.sink_slots) * 2
        return sink + self.middle.bytes_in_use() + held_bytes(self.sink_lengths, self.middle_start)
