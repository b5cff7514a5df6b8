"""`QuantizedMiddle`: a growable store's middle tokens as int8 or int4 codes with fp16 scales and zeros, which the
decode kernel reads as they are (`QuantizedPrunedKV`)."""

from __future__ import annotations

import functools

import torch

from ...kernels import ChannelLayout, QuantizedPrunedKV
from ...kernels.quantization import packed_width, quantize_keys, quantize_values
from ...kv_quantization import KVQuantization
from ...memory import held_bytes
from .buffers import grown, live_bytes
from .middle import Middle, Wrap

# Tokens quantized per step of an append: bounds the fp32 temporaries of a long prompt's flush (a multiple of every
# block size that divides it; others round it up to whole blocks).
_QUANTIZE_TOKENS = 1024


class QuantizedMiddle(Middle):
    """Middle tokens as `QuantizedPrunedKV` holds them: key codes `keys` `[B, chunks, M, chunk * bits / 8]` with
    `key_scales`/`key_zeros` `[B, chunks, M / block_size, chunk]` (per channel, per block of `block_size` columns), and
    value codes `values` `[B, Hv, M, D * bits / 8]` with `value_scales`/`value_zeros` `[B, Hv, M, D / q_group_size]`.

    Key blocks are aligned to columns: block `i` holds columns `[i * block_size, (i + 1) * block_size)`. The first
    tokens stored start `(-n) % block_size` columns in (flagged as no row's), so that they end on a block boundary;
    later tokens come in whole blocks (the window lets tokens go in whole blocks, and `SinkAndMiddle` then stores every
    column), so every block is quantized once, with all its tokens, and a `FixedStore` made after the prefill
    continues the same grid.

    Args:
        layout: the layer's `ChannelLayout`.
        like: keys `[B, H, Q, D]` of the layer's first step, for the batch, geometry, dtype and device.
        quantization: bits and value group (`KVQuantization`).
        block_size: columns per block of key scales (the window's flush).
    """

    def __init__(
        self, layout: ChannelLayout, like: torch.Tensor, quantization: KVQuantization, block_size: int
    ) -> None:
        batch, _, _, head_dim = like.shape
        self.bits, self.block_size = quantization.kv_bits, block_size
        self.group_size = quantization.group_size(head_dim)
        value_channels = layout.value_rows * head_dim
        per_token = quantization.middle_bytes(
            layout.packed_channels, value_channels, head_dim, block_size, like.element_size()
        )
        super().__init__(layout, like, per_token)
        chunk, rows = layout.chunk, layout.value_rows

        def empty(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device=like.device)

        self.keys = empty(batch, layout.num_chunks, 0, packed_width(chunk, self.bits), dtype=torch.uint8)
        self.key_scales = empty(batch, layout.num_chunks, 0, chunk)
        self.key_zeros = empty(batch, layout.num_chunks, 0, chunk)
        self.values = empty(batch, rows, 0, packed_width(head_dim, self.bits), dtype=torch.uint8)
        self.value_scales = empty(batch, rows, 0, head_dim // self.group_size)
        self.value_zeros = empty(batch, rows, 0, head_dim // self.group_size)

    def _first_column(self, count: int) -> int:
        return self.columns if self.columns else -count % self.block_size

    def _grow(self, capacity: int) -> None:
        columns, blocks = self.columns, -(-capacity // self.block_size)
        used_blocks = -(-columns // self.block_size)
        self.keys = grown(self.keys, 2, columns, capacity)
        self.key_scales = grown(self.key_scales, 2, used_blocks, blocks)
        self.key_zeros = grown(self.key_zeros, 2, used_blocks, blocks)
        for name in ("values", "value_scales", "value_zeros"):
            setattr(self, name, grown(getattr(self, name), 2, columns, capacity))

    def _write(self, keys: torch.Tensor, values: torch.Tensor, start: int, end: int) -> None:
        """Quantize in steps of whole blocks, from the block boundary at or before `start` (the first tokens' front
        padding holds zeros, flagged as no row's)."""
        block = self.block_size
        first = start // block * block
        if first != start and self.columns:
            raise RuntimeError(
                f"tokens appended to a quantized middle at column {start} start inside a key block of {block}: after "
                "the first tokens, the window lets tokens go in whole blocks"
            )
        for name in ("values", "value_scales", "value_zeros"):  # front padding: finite, as attention reads it
            getattr(self, name)[:, :, first:start] = 0
        step = -(-_QUANTIZE_TOKENS // block) * block
        value_rows = values.index_select(1, self.layout.value_heads)
        for low in range(first, end, step):
            high = min(low + step, end)
            new = max(low, start)  # the first of these columns with a new token
            part = slice(new - start, high - start)
            kept = self.layout.pruned_keys(keys[:, :, part])
            if new > low:
                kept = torch.cat([kept.new_zeros(*kept.shape[:2], new - low, kept.shape[3]), kept], dim=2)
            quantized_keys = quantize_keys(kept, self.bits, block, self.valid[:, None, low:high])
            self.keys[:, :, low:high] = quantized_keys.data
            self.key_scales[:, :, low // block : -(-high // block)] = quantized_keys.scales
            self.key_zeros[:, :, low // block : -(-high // block)] = quantized_keys.zeros
            quantized_values = quantize_values(
                value_rows[:, :, part], self.bits, self.group_size, self.valid[:, None, new:high]
            )
            self.values[:, :, new:high] = quantized_values.data
            self.value_scales[:, :, new:high] = quantized_values.scales
            self.value_zeros[:, :, new:high] = quantized_values.zeros

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Wrap]:
        columns, blocks = self.columns, -(-self.columns // self.block_size)
        wrap = functools.partial(
            _quantized, self.key_scales.narrow(2, 0, blocks), self.key_zeros.narrow(2, 0, blocks),
            self.value_scales.narrow(2, 0, columns), self.value_zeros.narrow(2, 0, columns), self.bits,
            self.block_size, self.group_size,
        )  # fmt: skip
        return (
            self.keys.narrow(2, 0, columns),
            self.values.narrow(2, 0, columns),
            self.valid.narrow(1, 0, columns),
            wrap,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("keys", "key_scales", "key_zeros", "values", "value_scales", "value_zeros", "valid")
        return {name: getattr(self, name) for name in names}

    def bytes_held(self) -> tuple[int, int, int]:
        return (
            held_bytes(self.keys, self.key_scales, self.key_zeros),
            held_bytes(self.values, self.value_scales, self.value_zeros),
            held_bytes(self.valid),
        )

    def bytes_in_use(self) -> int:
        columns, blocks = self.columns, -(-self.columns // self.block_size)
        per_column = (self.keys, self.values, self.value_scales, self.value_zeros)
        return (
            sum(live_bytes(t, 2, columns) for t in per_column)
            + sum(live_bytes(t, 2, blocks) for t in (self.key_scales, self.key_zeros))
            + live_bytes(self.valid, 1, columns)
        )


def _quantized(
    key_scales: torch.Tensor, key_zeros: torch.Tensor, value_scales: torch.Tensor, value_zeros: torch.Tensor,
    bits: int, block_size: int, group_size: int, cache,
) -> QuantizedPrunedKV:  # fmt: skip
    return QuantizedPrunedKV(cache, key_scales, key_zeros, value_scales, value_zeros, bits, block_size, group_size)
