"""`RecentWindow`: the latest tokens of every row at full width, in a buffer that grows with the rows it holds."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...memory import held_bytes
from .buffers import GROWTH_FRACTION, grown, live_bytes


class RecentWindow:
    """A growable store's recent window: its tokens sit at the front of `keys`, `values` `[B, H, W, D]` and `valid`
    `[B, W]` (False for padding), `length` of them.

    Tokens arrive at its end (`open`, after which the caller writes them). Once it holds `recent + block_size`, its
    oldest tokens leave it together in whole blocks of `block_size`, as many as leave at least `recent` (`leaving`,
    then `drop_leaving`): the window starts on a block boundary, so the stores behind it change once every
    `block_size` decode steps, always by whole blocks; between steps it holds `recent` to `recent + block_size - 1`
    tokens (fewer until the first tokens leave, or after a crop).

    The buffers grow only as far as the rows need: while no token has left (a short row, all window) by 1/16, as a
    `DynamicLayer` would hold about as much; once tokens have left, to `recent + block_size` slots at once, after which
    decoding never replaces them.
    """

    def __init__(self, recent: int, block_size: int, like: torch.Tensor) -> None:
        batch, heads, _, head_dim = like.shape
        self.recent = recent
        self.capacity = recent + block_size  # tokens held while a decode step attends, at most
        self.keys = like.new_empty(batch, heads, 0, head_dim)
        self.values = like.new_empty(batch, heads, 0, head_dim)
        self.valid = torch.empty(batch, 0, dtype=torch.bool, device=like.device)
        self.length = 0
        self.tokens_left = False  # some tokens have left: rows are longer than the window, which is full-size
        # Host-side knowledge that lets a flush skip reading padding flags back from the GPU: the latest tokens
        # counted in without flags (all of the window's, if at least its length).
        self.real_run = 0
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def open(self, count: int, valid: torch.Tensor | None, decode_room: bool = True) -> bool:
        """Count `count` tokens in at the window's end, for the caller to write; `valid` `[B, count]` their flags (None:
        all real). True when the buffers were replaced to make room.

        With `decode_room` (a step that attends) they grow by the class's rules; without it (the prefill, a generate
        call's memory peak) only as far as these tokens need: the first decode step adds the rest."""
        self.real_run = self.real_run + count if valid is None else 0
        needed = self.length + count
        replaced = needed > self.keys.shape[2]
        if replaced:
            capacity = needed
            if decode_room and self.tokens_left:
                capacity = max(needed, self.capacity)
            elif decode_room:
                capacity = max(needed, min(needed + max(1, int(needed * GROWTH_FRACTION)), self.capacity))
            self.keys = grown(self.keys, 2, self.length, capacity)
            self.values = grown(self.values, 2, self.length, capacity)
            self.valid = grown(self.valid, 1, self.length, capacity)
            self._views = {}
        self.length = needed
        return replaced

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The window's keys, values and flags (live slices), kept per length until the buffers are replaced: eager
        decoding reads them at every layer step."""
        view = self._views.get(self.length)
        if view is None:
            length = self.length
            view = self._views[length] = (
                self.keys.narrow(2, 0, length), self.values.narrow(2, 0, length), self.valid.narrow(1, 0, length),
            )  # fmt: skip
        return view

    def leaving_count(self, length: int) -> int:
        """How many of `length` tokens in the window leave it: none below `recent + block_size`, else the most whole
        blocks that leave at least `recent`."""
        if length < self.capacity:
            return 0
        block = self.capacity - self.recent
        return (length - self.recent) // block * block

    def pass_through(self, count: int) -> int:
        """How many of `count` tokens arriving together (a prompt) go straight to the stores behind the window: into an
        empty window, those that would leave it at once (`leaving_count`), so a long prompt is never copied into the
        window first (less time, and less memory at the prefill's peak)."""
        leaving = 0 if self.length else self.leaving_count(count)
        self.tokens_left = self.tokens_left or leaving > 0
        return leaving

    def leaving(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The tokens that leave a full window (`leaving_count`): keys, values (slices to store elsewhere before
        `drop_leaving`) and flags, None when every one is real."""
        leaving = self.leaving_count(self.length)
        all_real = self.real_run >= self.length
        self.tokens_left = True
        return self.keys[:, :, :leaving], self.values[:, :, :leaving], None if all_real else self.valid[:, :leaving]

    def drop_leaving(self) -> bool:
        """Move the tokens that stay (after `leaving`) to the front, in buffers no larger than the window needs between
        steps (a long chunked-prefill step may have grown them). True when the buffers were replaced."""
        leaving = self.leaving_count(self.length)
        staying = self.length - leaving
        shrinks = self.keys.shape[2] > self.capacity

        def kept(tensor: torch.Tensor, axis: int) -> torch.Tensor:
            latest = tensor.narrow(axis, leaving, staying).clone()
            if shrinks:
                shape = list(tensor.shape)
                shape[axis] = self.capacity
                tensor = tensor.new_empty(shape)
            tensor.narrow(axis, 0, staying).copy_(latest)
            return tensor

        self.keys, self.values, self.valid = kept(self.keys, 2), kept(self.values, 2), kept(self.valid, 1)
        self.length = staying
        if shrinks:
            self._views = {}
        return shrinks

    def crop(self, count: int) -> None:
        """Forget the latest `count` tokens (at most `length`)."""
        self.length -= count
        self.real_run = max(0, self.real_run - count)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-axis transform (beam reorder, repeat, select) to the buffers."""
        self.keys, self.values, self.valid = fn(self.keys), fn(self.values), fn(self.valid)
        self._views = {}

    def bytes_held(self) -> tuple[int, int, int]:
        """Allocated bytes of keys, values and flags."""
        return held_bytes(self.keys), held_bytes(self.values), held_bytes(self.valid)

    def bytes_in_use(self) -> int:
        """Bytes of the slots that hold tokens."""
        return live_bytes(self.keys, 2, self.length) * 2 + live_bytes(self.valid, 1, self.length)
