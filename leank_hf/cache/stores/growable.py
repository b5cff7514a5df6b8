"""`GrowableStore`: stores that grow as tokens come, for eager steps and every `generate` feature."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from ...kernels import ChannelLayout, LeanKAttention, NewTokens, PrunedKV, QuantizedPrunedKV
from ...memory import LayerMemory
from .base import NOT_LEANK_ATTENTION, LeanKStore, Step
from .middle import Middle, Wrap
from .sink_middle import SinkAndMiddle
from .window import RecentWindow

# Versions of a layer's stores, for the decode kernel's launch cache: unique across stores, layers and resets.
_STORE_VERSIONS = itertools.count()


class GrowableStore(LeanKStore):
    """A `LeanKStore` whose tensors grow as tokens come: a `RecentWindow` in front of a `SinkAndMiddle`.

    Each step's tokens join the window as attention reads them; whenever the window is full, its oldest tokens move on
    in whole blocks (`RecentWindow`), a row's first `sink` real ones to its sink and the others to the pruned middle.
    Lengths are host ints, so every step may have any number of tokens, and a step can be rolled back while its tokens
    are still in the window.

    Args:
        like: this layer's first keys `[B, H, Q, D]`, for the stores' batch, geometry, dtype and device.
        layout: the layer's `ChannelLayout`.
        middle: where middle tokens go (`PrunedMiddle` or `QuantizedMiddle`), empty.
        sink, recent, block_size: as `LeanKLayer`.
        attention: the layer's `LeanKAttention`, which keeps the decode kernel's launch set-up between steps.
    """

    def __init__(
        self, like: torch.Tensor, layout: ChannelLayout, middle: Middle, sink: int, recent: int, block_size: int,
        attention: LeanKAttention,
    ) -> None:  # fmt: skip
        self.layout, self.attention = layout, attention
        self.batch_size = like.shape[0]
        self.tokens = 0
        self._pending: Step | None = None
        self.flushed = SinkAndMiddle(sink, middle, like)
        self.window = RecentWindow(recent, block_size, like)
        self._stores_changed()

    # ------------------------------------------------------------------------------------------------- steps
    def stage(self, step: Step) -> None:
        if self._pending is not None:
            raise RuntimeError(
                f"LeanKLayer.update was called twice without attention in between: {NOT_LEANK_ATTENTION}"
            )
        self._pending = step
        self.tokens += step.keys.shape[2]

    @property
    def stored_tokens(self) -> int:
        pending = self._pending
        return self.tokens - (pending.keys.shape[2] if pending is not None else 0)

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.tokens + query_length, 0

    def attend(self, query: torch.Tensor, step: Step, valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """The step's tokens go to the end of the window as attention reads them (the decode kernel writes them
        itself); then the window gives up its oldest tokens if it is full (`settle`)."""
        self._take(step)
        if self.window.open(step.keys.shape[2], valid):
            self._stores_changed()
        output = self.attention(query, self.view(), scaling, NewTokens(step.keys, step.values, valid), self.version)
        self.settle()
        return output

    def commit(self, step: Step, valid: torch.Tensor | None) -> None:
        """Leaves the stores as `attend` would. The window is stored without the room decoding needs: the prefill is a
        generate call's memory peak (the model's activations for every prompt token), and the first decode step adds
        that room (one small copy per layer)."""
        self._take(step)
        keys, values = step.keys, step.values
        leaving = self.window.pass_through(keys.shape[2])
        if leaving:
            self._flush(keys[:, :, :leaving], values[:, :, :leaving], None if valid is None else valid[:, :leaving])
            keys, values = keys[:, :, leaving:], values[:, :, leaving:]
            valid = None if valid is None else valid[:, leaving:]
        if self.window.open(keys.shape[2], valid, decode_room=False):
            self._stores_changed()
        NewTokens(keys, values, valid).write(self.view())
        self.settle()

    def settle(self) -> None:
        """After a step: once the window holds `recent + block_size` tokens, its oldest leave it in whole blocks."""
        window = self.window
        if window.length < window.capacity:
            return
        self._flush(*window.leaving())
        if window.drop_leaving():
            self._stores_changed()

    def _flush(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        self._stores_changed()
        self.flushed.add(keys, values, valid)

    def _take(self, step: Step) -> None:
        if step is not self._pending:
            raise RuntimeError("LeanKLayer got a step this layer did not hand out")
        self._pending = None

    def view(self) -> PrunedKV | QuantizedPrunedKV:
        """Live slices, no copies. Eager decoding calls this for every layer at every step, so the slices are kept
        until the stores change: the sink's and middle's until the next flush, the window's per window length."""
        flushed = self._flushed_view
        if flushed is None:
            flushed = self._flushed_view = self.flushed.view()
        fields, wrap = flushed
        return wrap(PrunedKV(*fields, *self.window.view(), self.layout))

    def _stores_changed(self) -> None:
        """Forget the sink's and middle's views once they changed, and take a new version whenever any store changed
        or was replaced, which tells the decode kernel to read the stores' strides again."""
        self._flushed_view: tuple[tuple[torch.Tensor, ...], Wrap] | None = None
        self.version = next(_STORE_VERSIONS)

    # -------------------------------------------------------------------------------------------------- rows
    def crop(self, count: int) -> None:
        if count > self.window.length:
            raise ValueError(
                f"LeanKCache can only roll back tokens still in its full-width recent window ({self.window.length} "
                f"now); {count} were asked. Older tokens were already pruned. Use a larger `recent`, or a DynamicCache "
                "for decoding strategies that roll back further."
            )
        self.window.crop(count)
        self.tokens -= count

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.resize_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def resize_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self._pending is not None:
            raise RuntimeError("cannot reorder a LeanKCache in the middle of a forward pass")
        self.flushed.map_batch(fn)
        self.window.map_batch(fn)
        self.batch_size = self.flushed.sink_lengths.shape[0]
        self._stores_changed()

    # ------------------------------------------------------------------------------------------------ memory
    def memory(self, layer_idx: int) -> LayerMemory:
        """Against a `DynamicLayer` holding the same tokens."""
        flushed, window = self.flushed, self.window
        key_bytes, value_bytes, other_bytes = (a + b for a, b in zip(flushed.bytes_held(), window.bytes_held(),
                                                                      strict=True))  # fmt: skip
        batch, heads, _, head_dim = window.keys.shape
        dense = 2 * batch * heads * self.tokens * head_dim * window.keys.element_size()
        reserved = key_bytes + value_bytes + other_bytes - flushed.bytes_in_use() - window.bytes_in_use()
        return LayerMemory(layer_idx, "leank", key_bytes, value_bytes, other_bytes, reserved, dense)
