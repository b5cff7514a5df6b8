"""`FixedStore`: stores of fixed shapes with lengths on the device, so that `torch.compile` captures a decode step
whole (CUDA graphs)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...kernels import PrunedKV, QuantizedPrunedKV
from ...kernels.compiled import RegisteredLayout, pruned_attention
from ...memory import LayerMemory, held_bytes
from .base import LeanKStore, Step
from .fixed_middle import fixed_middle
from .growable import GrowableStore


class FixedStore(LeanKStore):
    """A `LeanKStore` made from a prefilled `GrowableStore`, whose decode steps change no shape and no host value.

    Its middle (a `FixedMiddle`, the fixed-size sibling of the prefill's) has a slot for every token up to
    `max_cache_len`, and its window is a ring of `recent + block_size` slots. Every token is written on arrival to its
    ring slot at full width, and reaches its middle slot before it leaves the window (`FixedMiddle.record`); attention
    counts it as a middle token once it has left, which tokens do `block_size` at a time exactly as in a
    `GrowableStore`: the attention is the same, step for step. Only two device scalars change from step to step:
    `tokens` (the next token's position) and the stored middle length.

    It needs, from the prefill, every row's sink full and no padding in the window (prompts of at least `sink + recent
    + block_size` real tokens always have both); then one token per step (no chunked prefill or assisted decoding),
    real decode tokens (as `generate`'s are), and room: like a `StaticCache`, the prompt and the new tokens must fit
    in `max_cache_len`. Beam reorders are done in place; nothing can be rolled back.

    Args:
        prefill: the store that took the prompt; its tensors move here (the sink's) or are copied.
        max_cache_len: the most tokens a row will hold (prompt and new tokens).
        registered: the layer's layout as the compiled attention operator knows it.
    """

    def __init__(self, prefill: GrowableStore, max_cache_len: int, registered: RegisteredLayout) -> None:
        flushed, window = prefill.flushed, prefill.window
        length, in_window, middle = prefill.tokens, window.length, flushed.middle.columns
        self.ring = window.capacity  # tokens in the window while a step attends, at most
        if not flushed.sinks_full or flushed.middle_has_holes or not bool(window.valid[:, :in_window].all()):
            raise ValueError(
                "a LeanKCache with max_cache_len needs every row's sink filled and no padding in the window when the "
                f"prefill ends, which prompts of at least sink + recent + block_size = {flushed.sink + self.ring} real "
                "tokens always give; some row's prompt is too short (or came in chunks: prefill_chunk_size). Use a "
                "LeanKCache without max_cache_len for it"
            )
        if length >= max_cache_len:
            raise ValueError(
                f"the prompt ({length} tokens) leaves no room in max_cache_len={max_cache_len}: give max_cache_len at "
                "least the prompt length plus max_new_tokens"
            )
        self.layout, self.registered, self.max_cache_len = prefill.layout, registered, max_cache_len
        self.batch_size = prefill.batch_size
        self.block_size = self.ring - window.recent  # tokens that leave the window at a time
        self.stored_tokens = length  # on the host, the prompt's: decode steps count on the device (`tokens`)
        boundary = length - in_window  # the first token still in the window
        self.middle_base = boundary - middle  # the token in middle slot 0
        batch, heads, _, head_dim = window.keys.shape
        device = window.keys.device
        self.sink_keys, self.sink_values = flushed.sink_keys, flushed.sink_values
        self.sink_lengths, self.middle_start = flushed.sink_lengths, flushed.middle_start
        window_keys, window_values = window.keys[:, :, :in_window], window.values[:, :, :in_window]
        self.middle = fixed_middle(flushed.middle, window_keys, window_values, max_cache_len - self.middle_base,
                                   self.ring, self.middle_base)  # fmt: skip
        capacity = self.middle.capacity
        ring_slots = torch.arange(boundary, length, device=device) % self.ring
        self.recent_keys = window.keys.new_zeros(batch, heads, self.ring, head_dim)
        self.recent_keys.index_copy_(2, ring_slots, window_keys)
        self.recent_values = torch.zeros_like(self.recent_keys).index_copy_(2, ring_slots, window_values)
        self.recent_valid = torch.zeros(batch, self.ring, dtype=torch.bool, device=device)
        self.middle_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.tokens = torch.tensor(length, device=device)
        self.middle_length = torch.tensor(middle, device=device)
        self.ring_slots = torch.arange(self.ring, device=device)
        self.middle_slots = torch.arange(capacity, device=device)
        self._refresh_flags(self.tokens)
        for tensor in (*self._stores(), self.tokens, self.middle_length):
            torch._dynamo.mark_static_address(tensor)  # replayed graphs read and write them in place

    def _stores(self) -> tuple[torch.Tensor, ...]:
        """The stored tokens' tensors."""
        return (
            self.sink_keys, self.sink_values, self.sink_lengths, *self.middle.tensors(), self.middle_valid,
            self.middle_start, self.recent_keys, self.recent_values, self.recent_valid,
        )  # fmt: skip

    def _step_state(self) -> tuple[torch.Tensor, ...]:
        """What steps read besides the stores: the device scalars and every ring and middle slot's number."""
        return self.tokens, self.middle_length, self.ring_slots, self.middle_slots

    # ------------------------------------------------------------------------------------------------- steps
    def stage(self, step: Step) -> None:
        """Nothing to note: a compiled step must change no host state, so that it replays as is."""

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # no mask is read (decode tokens are real), so its size stays fixed

    def attend(self, query: torch.Tensor, step: Step, valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Write the token to its ring and middle slots, attend, and move the window's boundary."""
        if step.keys.shape[2] != 1:
            raise ValueError(
                "a LeanKCache with max_cache_len decodes one token per step after the prefill, got "
                f"{step.keys.shape[2]}: chunked prefill (prefill_chunk_size) and assisted decoding need a LeanKCache "
                "without max_cache_len"
            )
        keys, values, position = step.keys, step.values, self.tokens
        ring_slot = torch.remainder(position, self.ring).view(1)
        self.recent_keys.index_copy_(2, ring_slot, keys)
        self.recent_values.index_copy_(2, ring_slot, values)
        self.middle.record(keys, values, position, self.middle_length, self.recent_keys, self.recent_values)
        self._refresh_flags(position)
        middle_keys, middle_values, *quantization = self.middle.attention_operands()
        output = pruned_attention(
            query, self.sink_keys, self.sink_values, self.sink_lengths, middle_keys, middle_values, self.middle_valid,
            self.middle_start, self.middle_length, self.recent_keys, self.recent_values, self.recent_valid,
            self.registered.index, scaling, *quantization,
        )  # fmt: skip
        # Once the window holds `recent + block_size` tokens, its oldest `block_size` leave it (`GrowableStore.settle`).
        in_window = position + 1 - self.middle_base - self.middle_length
        self.middle_length.add_((in_window >= self.ring).long() * self.block_size)
        self.tokens.add_(1)
        return output

    def _refresh_flags(self, position: torch.Tensor) -> None:
        """Window flags: a ring slot is in the window if its token is past the middle's end. Middle flags (read by the
        PyTorch path; the kernel reads `middle_start` and the length): slots from the row's start to the length."""
        columns = position - torch.remainder(position - self.ring_slots, self.ring)  # the token each slot holds
        self.recent_valid.copy_((columns >= self.middle_base + self.middle_length).expand_as(self.recent_valid))
        slots = self.middle_slots
        self.middle_valid.copy_((slots >= self.middle_start[:, None]) & (slots < self.middle_length))

    def commit(self, step: Step, valid: torch.Tensor | None) -> None:
        raise RuntimeError("a FixedStore holds a prompt already: it is made from a prefilled GrowableStore")

    def view(self) -> PrunedKV | QuantizedPrunedKV:
        """The stores' whole capacity, with the stored middle length on the device (`PrunedKV.middle_length`)."""
        middle_keys, middle_values, *quantization = self.middle.attention_operands()
        cache = PrunedKV(
            self.sink_keys, self.sink_values, self.sink_lengths, middle_keys, middle_values, self.middle_valid,
            self.middle_start, self.recent_keys, self.recent_values, self.recent_valid, self.layout,
            self.middle_length,
        )  # fmt: skip
        return cache if quantization[0] is None else QuantizedPrunedKV(cache, *quantization)

    # -------------------------------------------------------------------------------------------------- rows
    def crop(self, count: int) -> None:
        raise ValueError(
            "a LeanKCache with max_cache_len cannot roll tokens back (assisted decoding); use one without it"
        )

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for tensor in self._stores():  # in place: compiled steps hold these addresses
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def resize_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise ValueError("a LeanKCache with max_cache_len keeps its batch size once filled; use one without it")

    # ------------------------------------------------------------------------------------------------ memory
    def memory(self, layer_idx: int) -> LayerMemory:
        """Against a `StaticLayer` of `max_cache_len`, which holds that many tokens from its first on. Every tensor is
        in use but the middle slots of positions not reached yet."""
        middle_key_bytes, middle_value_bytes, middle_other_bytes = self.middle.bytes_held()
        key_bytes = held_bytes(self.sink_keys, self.recent_keys) + middle_key_bytes
        value_bytes = held_bytes(self.sink_values, self.recent_values) + middle_value_bytes
        other_bytes = middle_other_bytes + held_bytes(
            self.sink_lengths, self.middle_valid, self.middle_start, self.recent_valid, *self._step_state()
        )
        batch, heads, _, head_dim = self.recent_keys.shape
        dense = 2 * batch * heads * self.max_cache_len * head_dim * self.recent_keys.element_size()
        unused = 1 - (int(self.tokens) - self.middle_base) / self.middle.capacity
        reserved = int(unused * (middle_key_bytes + middle_value_bytes + held_bytes(self.middle_valid)))
        return LayerMemory(layer_idx, "leank", key_bytes, value_bytes, other_bytes, reserved, dense)
