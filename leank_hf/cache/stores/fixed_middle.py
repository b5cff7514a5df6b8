"""A `FixedStore`'s middle, with a slot for every position up to `max_cache_len` and no host state that changes from
step to step: `FixedPrunedMiddle` (the model's dtype) and `FixedQuantizedMiddle` (low-bit codes), made from the
growable siblings that took the prompt (`PrunedMiddle`, `QuantizedMiddle`)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ...kernels import ChannelLayout
from ...kernels.quantization import quantize_keys, quantize_values
from ...memory import held_bytes
from .middle import Middle, PrunedMiddle
from .quantized_middle import QuantizedMiddle


class FixedMiddle(ABC):
    """Middle slots `[0, capacity)`; slot `s` holds the token at position `middle_base + s`. The `FixedStore` counts
    the stored ones on the device (`middle_length`) and flags them.

    Args:
        prefill: the growable middle that took the prompt; its stored columns are copied.
        window_keys, window_values: `[B, H, W, D]`, the prompt's tokens still in the window, which follow the stored
            columns.
        needed: slots the store needs (`max_cache_len - middle_base`); `capacity` may be more.
        ring: the window's ring slots (`recent + block_size`); position `p` sits in ring slot `p % ring`.
        middle_base: the position of slot 0.
    """

    layout: ChannelLayout
    capacity: int

    @abstractmethod
    def record(
        self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, middle_length: torch.Tensor,
        ring_keys: torch.Tensor, ring_values: torch.Tensor,
    ) -> None:  # fmt: skip
        """Store what this step needs in the middle, once its token `[B, H, 1, D]` (at device `position`) is in its
        ring slot and before attention: at least every token that leaves the window after this step."""

    @abstractmethod
    def attention_operands(self) -> tuple[torch.Tensor | int | None, ...]:
        """The middle's arguments of `pruned_attention` (see it)."""

    @abstractmethod
    def stored(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The tensors that hold keys and those that hold values (scales with what they scale), batch axis first."""

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every stored tensor, for in-place reorders and static addresses."""
        keys, values = self.stored()
        return (*keys, *values)

    def bytes_held(self) -> tuple[int, int, int]:
        """Allocated bytes of keys, values and the rest."""
        keys, values = self.stored()
        return held_bytes(*keys), held_bytes(*values), held_bytes(*self.bookkeeping)

    bookkeeping: tuple[torch.Tensor, ...] = ()


def fixed_middle(
    prefill: Middle, window_keys: torch.Tensor, window_values: torch.Tensor, needed: int, ring: int, middle_base: int
) -> FixedMiddle:
    """The fixed-size sibling of `prefill`."""
    if isinstance(prefill, QuantizedMiddle):
        return FixedQuantizedMiddle(prefill, needed, ring, middle_base)
    assert isinstance(prefill, PrunedMiddle)
    return FixedPrunedMiddle(prefill, window_keys, window_values, needed, middle_base)


class FixedPrunedMiddle(FixedMiddle):
    """Every token is written to its slot on arrival, on its kept channels, also while it is still in the window (it
    counts as a middle token once `middle_length` passes it)."""

    def __init__(
        self, prefill: PrunedMiddle, window_keys: torch.Tensor, window_values: torch.Tensor, needed: int,
        middle_base: int,
    ) -> None:  # fmt: skip
        self.layout, self.capacity, self.middle_base = prefill.layout, needed, middle_base
        batch, stored = prefill.keys.shape[0], prefill.columns
        self.keys = prefill.keys.new_zeros(self.layout.middle_key_shape(batch, needed))
        self.values = prefill.values.new_zeros(batch, prefill.values.shape[1], needed, prefill.values.shape[3])
        self.keys[:, :, :stored] = prefill.keys[:, :, :stored]
        self.values[:, :, :stored] = prefill.values[:, :, :stored]
        if self.layout.packed_channels:  # the window's tokens also go to their middle slots, for when they leave
            in_window = window_keys.shape[2]
            self.layout.write_middle(
                window_keys, window_values, self.keys[:, :, stored : stored + in_window],
                self.values[:, :, stored : stored + in_window],
            )  # fmt: skip

    def record(
        self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, middle_length: torch.Tensor,
        ring_keys: torch.Tensor, ring_values: torch.Tensor,
    ) -> None:  # fmt: skip
        if self.layout.packed_channels:
            slot = (position - self.middle_base).view(1)
            self.keys.index_copy_(2, slot, self.layout.pruned_keys(keys))
            self.values.index_copy_(2, slot, values.index_select(1, self.layout.value_heads))

    def attention_operands(self) -> tuple[torch.Tensor | int | None, ...]:
        return self.keys, self.values, None, None, None, None, 0, 0, 0

    def stored(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        return (self.keys,), (self.values,)


class FixedQuantizedMiddle(FixedMiddle):
    """Codes and scales as in `QuantizedMiddle`, with key blocks on the same grid. A block is quantized when it leaves
    the window, all its tokens there: each step quantizes the window's oldest `block_size` tokens (from the ring) into
    the slots past the stored ones, which nothing reads until `middle_length` moves past them, at the step where they
    leave. (One block per layer per step: no host decision, so the compiled step stays one graph.)"""

    def __init__(self, prefill: QuantizedMiddle, needed: int, ring: int, middle_base: int) -> None:
        self.layout, self.ring, self.middle_base = prefill.layout, ring, middle_base
        self.bits, self.block_size, self.group_size = prefill.bits, prefill.block_size, prefill.group_size
        block, stored = self.block_size, prefill.columns
        if stored % block:
            raise RuntimeError(
                f"a prefilled quantized middle ends inside a key block ({stored} columns, blocks of {block}); a "
                "FixedStore is made right after a one-chunk prefill, which never does"
            )
        # The block written at each step may reach `block_size` slots past the last stored position.
        self.capacity = -(-(needed + block) // block) * block
        self.block_offsets = torch.arange(block, device=prefill.keys.device)
        self.bookkeeping = (self.block_offsets,)

        def copied(tensor: torch.Tensor, size: int, used: int) -> torch.Tensor:
            fixed = tensor.new_zeros(*tensor.shape[:2], size, *tensor.shape[3:])
            fixed[:, :, :used] = tensor[:, :, :used]
            return fixed

        blocks = self.capacity // block
        self.keys = copied(prefill.keys, self.capacity, stored)
        self.key_scales = copied(prefill.key_scales, blocks, stored // block)
        self.key_zeros = copied(prefill.key_zeros, blocks, stored // block)
        self.values = copied(prefill.values, self.capacity, stored)
        self.value_scales = copied(prefill.value_scales, self.capacity, stored)
        self.value_zeros = copied(prefill.value_zeros, self.capacity, stored)

    def record(
        self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, middle_length: torch.Tensor,
        ring_keys: torch.Tensor, ring_values: torch.Tensor,
    ) -> None:  # fmt: skip
        if not self.layout.packed_channels:
            return
        slots = middle_length + self.block_offsets
        ring_slots = torch.remainder(self.middle_base + slots, self.ring)
        block_keys = self.layout.pruned_keys(ring_keys.index_select(2, ring_slots))
        block_values = ring_values.index_select(2, ring_slots).index_select(1, self.layout.value_heads)
        quantized_keys = quantize_keys(block_keys, self.bits, self.block_size)
        quantized_values = quantize_values(block_values, self.bits, self.group_size)
        block = torch.div(middle_length, self.block_size, rounding_mode="floor").view(1)
        self.keys.index_copy_(2, slots, quantized_keys.data)
        self.key_scales.index_copy_(2, block, quantized_keys.scales)
        self.key_zeros.index_copy_(2, block, quantized_keys.zeros)
        self.values.index_copy_(2, slots, quantized_values.data)
        self.value_scales.index_copy_(2, slots, quantized_values.scales)
        self.value_zeros.index_copy_(2, slots, quantized_values.zeros)

    def attention_operands(self) -> tuple[torch.Tensor | int | None, ...]:
        return (
            self.keys, self.values, self.key_scales, self.key_zeros, self.value_scales, self.value_zeros, self.bits,
            self.block_size, self.group_size,
        )  # fmt: skip

    def stored(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        return (self.keys, self.key_scales, self.key_zeros), (self.values, self.value_scales, self.value_zeros)
