"""A growable store's middle: the tokens that left the window and are not a row's sink, on their kept key channels.

Siblings: `PrunedMiddle` (here, the model's dtype) and `QuantizedMiddle` (`quantized_middle.py`, low-bit codes read
by the kernels as they are); `SinkAndMiddle` holds one, and `fixed_middle.py` has their fixed-size forms.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ...kernels import ChannelLayout, PrunedKV, QuantizedPrunedKV
from ...memory import held_bytes
from .buffers import GROWTH_FRACTION, grown, live_bytes

# Turns the `PrunedKV` of a middle's view into what attention reads (a quantized middle adds its scales).
Wrap = Callable[[PrunedKV], PrunedKV | QuantizedPrunedKV]


def _as_is(cache: PrunedKV) -> PrunedKV:
    return cache


class Middle(ABC):
    """Middle tokens, `columns` slots per row, with flags `valid` `[B, M]` (False for a slot that holds no real token of
    the row: padding, or a column another row needed).

    The stores grow by `GROWTH_FRACTION` of their size, or by what the layer's pruning saves if that is less, so that
    their reserve never costs more than pruning saved. Nothing is stored when every head prunes every channel:
    nothing would ever read it.
    """

    def __init__(self, layout: ChannelLayout, like: torch.Tensor, bytes_per_token: float) -> None:
        batch, heads, _, head_dim = like.shape
        self.layout = layout
        full = 2 * heads * head_dim * like.element_size()
        self.growth = min(GROWTH_FRACTION, (full - bytes_per_token) / bytes_per_token) if bytes_per_token else 0.0
        self.valid = torch.empty(batch, 0, dtype=torch.bool, device=like.device)
        self.columns = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor, to_middle: torch.Tensor | None) -> int:
        """Store tokens `[B, H, n, D]` at the end; `to_middle` `[B, n]` flags the real ones (None: all). Returns the
        column of the first of them."""
        if self.layout.packed_channels == 0:
            return self.columns
        start = self._first_column(keys.shape[2])
        end = start + keys.shape[2]
        held = self.valid.shape[1]
        if end > held:
            capacity = max(end, held + int(held * self.growth))
            self.valid = grown(self.valid, 1, self.columns, capacity)
            self._grow(capacity)
        self.valid[:, self.columns : start] = False
        flags = self.valid.narrow(1, start, end - start)
        if to_middle is None:
            flags.fill_(True)
        else:
            flags.copy_(to_middle)
        self._write(keys, values, start, end)
        self.columns = end
        return start

    def _first_column(self, count: int) -> int:
        """Where `count` appended tokens start: right after the stored ones."""
        return self.columns

    @abstractmethod
    def _grow(self, capacity: int) -> None:
        """Room for `capacity` columns in every store but the flags, keeping the first `columns`."""

    @abstractmethod
    def _write(self, keys: torch.Tensor, values: torch.Tensor, start: int, end: int) -> None:
        """Store tokens `[B, H, n, D]` in columns `[start, end)`, whose flags are set."""

    @abstractmethod
    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Wrap]:
        """The stored columns' keys, values and flags (live slices) as `PrunedKV` holds them, and what turns the
        `PrunedKV` made with them into what attention reads."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor with a batch axis, by attribute name (for `map_batch`)."""

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-axis transform (beam reorder, repeat, select) to every tensor."""
        for name, tensor in self.tensors().items():
            setattr(self, name, fn(tensor))

    @abstractmethod
    def bytes_held(self) -> tuple[int, int, int]:
        """Allocated bytes of keys, values and the rest (flags), scales counted with what they scale."""

    @abstractmethod
    def bytes_in_use(self) -> int:
        """Bytes of the columns that hold tokens."""


class PrunedMiddle(Middle):
    """Middle tokens in the model's dtype: `keys` `[B, chunks, M, chunk]` (chunk-major, see `ChannelLayout`) and
    `values` `[B, Hv, M, D]`."""

    def __init__(self, layout: ChannelLayout, like: torch.Tensor) -> None:
        batch, _, _, head_dim = like.shape
        per_token = (layout.packed_channels + layout.value_rows * head_dim) * like.element_size()
        super().__init__(layout, like, per_token)
        self.keys = like.new_empty(layout.middle_key_shape(batch, 0))
        self.values = like.new_empty(batch, layout.value_rows, 0, head_dim)

    def _grow(self, capacity: int) -> None:
        self.keys = grown(self.keys, 2, self.columns, capacity)
        self.values = grown(self.values, 2, self.columns, capacity)

    def _write(self, keys: torch.Tensor, values: torch.Tensor, start: int, end: int) -> None:
        self.layout.write_middle(keys, values, self.keys[:, :, start:end], self.values[:, :, start:end])

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Wrap]:
        columns = self.columns
        keys, values = self.keys.narrow(2, 0, columns), self.values.narrow(2, 0, columns)
        return keys, values, self.valid.narrow(1, 0, columns), _as_is

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "valid": self.valid}

    def bytes_held(self) -> tuple[int, int, int]:
        return held_bytes(self.keys), held_bytes(self.values), held_bytes(self.valid)

    def bytes_in_use(self) -> int:
        return sum(live_bytes(t, 2, self.columns) for t in (self.keys, self.values)) + live_bytes(
            self.valid, 1, self.columns
        )
