"""`StaticLeanKLayer`: a LeanK layer whose decode steps `torch.compile` can capture in a CUDA graph."""

from __future__ import annotations

import torch

from .cache_layer import _STORE_NAMES, LeanKLayer, PendingStep
from .kernels import ChannelLayout
from .kernels.compiled import pruned_attention, register_layout
from .memory import held_bytes


class StaticLeanKLayer(LeanKLayer):
    """A `LeanKLayer` whose decode steps keep every shape fixed and every length on the device, so that `generate`'s
    compiled decoding (`torch.compile`, CUDA graphs) captures them; eager decoding on the host is what limits
    `LeanKLayer` at small batches.

    The prefill runs as in `LeanKLayer`. The layer then moves into fixed-size stores (`_freeze`): middle stores with
    a slot for every token up to `max_cache_len`, and the window as a ring of `recent + block_size` slots. From then
    on every token is written on arrival to both, at full width into its ring slot and on its kept channels into its
    middle slot, and attention counts it as a middle token once it has left the window, which tokens do
    `block_size` at a time exactly as in `LeanKLayer`: the attention is the same, step for step. Only two device
    scalars change from step to step: the next token's position and the stored middle length.

    Decoding this way needs, when the prefill ends, every row's sink full and no padding in the window (prompts of at
    least `sink + recent + block_size` real tokens always have both), one token per step (no chunked prefill or
    assisted decoding), real decode tokens (as `generate`'s are), and room: like a `StaticCache`, the prompt and the
    new tokens must fit in `max_cache_len`. Beam reorders are done in place.

    Args:
        channel_mask, sink, recent, block_size: as `LeanKLayer`.
        max_cache_len: the most tokens a row will hold (prompt and new tokens).
    """

    is_compileable = True
    is_croppable = False  # fixed-size stores are written in place: nothing is kept to roll back to

    def __init__(self, channel_mask: torch.Tensor, sink: int, recent: int, block_size: int, max_cache_len: int) -> None:
        super().__init__(channel_mask, sink, recent, block_size)
        self.max_cache_len = max_cache_len
        self._ring = recent + block_size  # tokens in the window while a step attends, at most

    def _clear(self) -> None:
        super()._clear()
        self._frozen = False

    def _build_layout(self) -> ChannelLayout:
        # The shared layout of these masks on this device, named by an int the compiled operator can hold.
        self._registered = register_layout(self.channel_mask, self.device)
        return self._registered.layout

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[PendingStep, PendingStep]:
        if not self._frozen:
            return super().update(key_states, value_states, *args, **kwargs)
        self._check_batch(key_states.shape[0])
        step = PendingStep(self, key_states, value_states)  # no host state changes: a compiled step replays as is
        return step, step

    def get_seq_length(self) -> int | torch.Tensor:
        """Tokens stored; after the prefill a 0-d tensor on the device (as `StaticLayer` returns), so that reading it
        never waits for the GPU."""
        return self._position if self._frozen else super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # After the prefill no mask is read (decode tokens are real), so its size stays fixed.
        return (query_length, 0) if self._frozen else super().get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return self.max_cache_len

    def commit(self, step: PendingStep, valid: torch.Tensor | None) -> None:
        super().commit(step, valid)
        self._freeze()

    def attend(
        self, query: torch.Tensor, step: PendingStep, valid: torch.Tensor | None, scaling: float
    ) -> torch.Tensor:
        """A decode step on the fixed-size stores: write the token, attend, and move the window's boundary."""
        if step.keys.shape[2] != 1:
            raise ValueError(
                "a LeanKCache with max_cache_len decodes one token per step after the prefill, got "
                f"{step.keys.shape[2]}: chunked prefill (prefill_chunk_size) and assisted decoding need a LeanKCache "
                "without max_cache_len"
            )
        keys, values, position = step.keys, step.values, self._position
        ring_slot = torch.remainder(position, self._ring).view(1)
        self.recent_keys.index_copy_(2, ring_slot, keys)
        self.recent_values.index_copy_(2, ring_slot, values)
        if self.layout.packed_channels:
            middle_slot = (position - self._middle_base).view(1)
            self.middle_keys.index_copy_(2, middle_slot, self.layout.pruned_keys(keys))
            self.middle_values.index_copy_(2, middle_slot, values.index_select(1, self.layout.value_heads))
        self._refresh_flags(position)
        output = pruned_attention(
            query, self.sink_keys, self.sink_values, self.sink_lengths, self.middle_keys, self.middle_values,
            self.middle_valid, self.middle_start, self._middle_length, self.recent_keys, self.recent_values,
            self.recent_valid, self._registered.index, scaling,
        )  # fmt: skip
        # Once the window holds `recent + block_size` tokens, its oldest `block_size` leave it (`LeanKLayer.settle`).
        in_window = position + 1 - self._middle_base - self._middle_length
        self._middle_length.add_((in_window >= self._ring).long() * self.block_size)
        self._position.add_(1)
        return output

    def _refresh_flags(self, position: torch.Tensor) -> None:
        """Window flags: a ring slot is in the window if its token is past the middle's end. Middle flags (read by the
        PyTorch path; the kernel reads `middle_start` and the length): slots from the row's start to the length."""
        columns = position - torch.remainder(position - self._ring_slots, self._ring)  # the token each slot holds
        self.recent_valid.copy_((columns >= self._middle_base + self._middle_length).expand_as(self.recent_valid))
        slots = self._middle_slots
        self.middle_valid.copy_((slots >= self.middle_start[:, None]) & (slots < self._middle_length))

    def _freeze(self) -> None:
        """Move the prefilled tokens into the fixed-size stores; from here on no store is replaced."""
        window, length = self._window, self.seq_len
        if not self._sinks_full or self._middle_has_holes or not bool(self.recent_valid[:, :window].all()):
            raise ValueError(
                "a LeanKCache with max_cache_len needs every row's sink filled and no padding in the window when the "
                f"prefill ends, which prompts of at least sink + recent + block_size = {self.sink + self._ring} real "
                "tokens always give; some row's prompt is too short (or came in chunks: prefill_chunk_size). Use a "
                "LeanKCache without max_cache_len for it"
            )
        if length >= self.max_cache_len:
            raise ValueError(
                f"the prompt ({length} tokens) leaves no room in max_cache_len={self.max_cache_len}: give "
                "max_cache_len at least the prompt length plus max_new_tokens"
            )
        boundary = length - window  # the first token still in the window
        self._middle_base = boundary - self._middle  # the token in middle slot 0
        capacity = self.max_cache_len - self._middle_base
        batch, heads, _, head_dim = self.recent_keys.shape
        device = self.device
        middle_keys = self.middle_keys.new_zeros(self.layout.middle_key_shape(batch, capacity))
        middle_values = self.middle_values.new_zeros(batch, self.middle_values.shape[1], capacity, head_dim)
        middle_keys[:, :, : self._middle] = self.middle_keys[:, :, : self._middle]
        middle_values[:, :, : self._middle] = self.middle_values[:, :, : self._middle]
        window_keys, window_values = self.recent_keys[:, :, :window], self.recent_values[:, :, :window]
        if self.layout.packed_channels:  # the window's tokens also go to their middle slots, for when they leave
            self.layout.write_middle(
                window_keys, window_values, middle_keys[:, :, self._middle : self._middle + window],
                middle_values[:, :, self._middle : self._middle + window],
            )  # fmt: skip
        ring_slots = torch.arange(boundary, length, device=device) % self._ring
        self.recent_keys = self.recent_keys.new_zeros(batch, heads, self._ring, head_dim).index_copy_(
            2, ring_slots, window_keys
        )
        self.recent_values = torch.zeros_like(self.recent_keys).index_copy_(2, ring_slots, window_values)
        self.middle_keys, self.middle_values = middle_keys, middle_values
        self.recent_valid = torch.zeros(batch, self._ring, dtype=torch.bool, device=device)
        self.middle_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self._position = torch.tensor(length, device=device)
        self._middle_length = torch.tensor(self._middle, device=device)
        self._ring_slots = torch.arange(self._ring, device=device)
        self._middle_slots = torch.arange(capacity, device=device)
        self._refresh_flags(self._position)
        for tensor in (*self._stores(), self._position, self._middle_length):
            torch._dynamo.mark_static_address(tensor)  # replayed graphs read and write them in place
        self._stores_changed(window=True)
        self._frozen = True

    def _stores(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in _STORE_NAMES)

    def crop(self, tokens_to_remove: int | torch.Tensor) -> None:
        if self._frozen and int(tokens_to_remove) != 0:
            raise ValueError(
                "a LeanKCache with max_cache_len cannot roll tokens back (assisted decoding); use one without it"
            )
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self._frozen:
            super().reorder_cache(beam_idx)
            return
        for tensor in self._stores():  # in place: compiled steps hold these addresses
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse_batch_change()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse_batch_change()
        super().batch_select_indices(indices)

    def _refuse_batch_change(self) -> None:
        if self._frozen:
            raise ValueError("a LeanKCache with max_cache_len keeps its batch size once filled; use one without it")

    def _bookkeeping(self) -> tuple[torch.Tensor | None, ...]:
        if not self._frozen:
            return super()._bookkeeping()
        return (*super()._bookkeeping(), *self._step_state())

    def _stored_count(self) -> int:
        return self.max_cache_len  # what a `StaticLayer` holds from its first token on

    def _bytes_in_use(self) -> int:
        if not self._frozen:
            return super()._bytes_in_use()
        # Every store is in use but the middle slots of positions not reached yet.
        unused = (self.max_cache_len - int(self._position)) / (self.max_cache_len - self._middle_base)
        reserved = int(unused * held_bytes(self.middle_keys, self.middle_values, self.middle_valid))
        return held_bytes(*self._stores(), *self._step_state()) - reserved

    def _step_state(self) -> tuple[torch.Tensor, ...]:
        """What compiled steps read besides the stores: the device scalars and every ring and middle slot's number."""
        return self._position, self._middle_length, self._ring_slots, self._middle_slots
