"""Low-bit storage for a LeanK layer's middle tokens: the arithmetic a quantized store writes and the decode kernel
undoes in registers. Plain tensors in and out, no HF types.

The recipe is KIVI's (Liu et al., 2024, arXiv 2402.02750), which lines up with LeanK's flushes: keys are quantized
per channel over blocks of `block_size` consecutive middle tokens (the tokens a flush moves out of the window
together), values per token in groups of `group_size` channels. Post-RoPE keys have a few channels of large magnitude
(and offset): a per-channel grid spends its levels on each channel's own range, where a per-token one would spend
them on the outliers' (`benchmarks/quantization_error.py` measures both).

Both are asymmetric: a group of elements `x` gets `zero <= min(x)` and `scale >= (max(x) - zero) / (2**bits - 1)`,
and stores `code = round((x - zero) / scale)` in `[0, 2**bits - 1]`, so `x ≈ zero + code * scale` within `scale / 2`.
Scales and zeros are stored in fp16 (`METADATA_DTYPE`) whatever the model's dtype: 4 bytes per group in every model
(an fp32 model's dtype would spend 8). The zero is rounded down and the scale up to fp16, so the stored grid still
covers `[min, max]` and the `scale / 2` bound holds for the stored scale; the rounding widens a group's range by less
than |min| / 1024, where bf16's 8 significant bits would widen it by up to |min| / 128: for a channel offset by 300
with a range of 2, fp16 adds 15 % to its int8 step and bf16 would double it. (On SmolLM2's keys, bf16 scales measured
no worse in attention error, `benchmarks/quantization_error.py`: fp16 is the safe choice, not a measured gain.)
Elements beyond fp16's range (|x| > 65504) saturate; SmolLM2's largest |key| or |value| is 28.

Bytes per middle token (codes plus fp16 scale and zero):

| | per kept key channel | per value-head channel |
|---|---|---|
| 8 bits | 1 + 4 / block_size (1.0625 at 64) | 1 + 4 / group_size (1.125 at 32, 1.0625 at 64) |
| 4 bits | 0.5 + 4 / block_size (0.5625 at 64) | 0.5 + 4 / group_size (0.625 at 32, 0.5625 at 64) |

against 2 in bf16/fp16.

int4 packs two codes per byte along the last axis (channels: a key's kept channels, a value's head_dim), split in
halves: byte `j` of a row of `n` codes holds code `j` in its low nibble and code `j + ceil(n / 2)` in its high nibble
(0 there when `n` is odd and `j` is the last byte). Why along channels: a decode kernel loads a `[BLOCK_T, chunk / 2]`
byte tile of one chunk of kept channels (contiguous in the chunk-major store); its low nibbles are channels
`[0, chunk / 2)` and its high nibbles `[chunk / 2, chunk)`, two half-tiles that each dot with one contiguous half of the
(scaled) query, giving one score per token in token order. Packed along tokens instead, a tile would give the even
tokens' scores and the odd tokens' apart, to be interleaved again before the softmax and the values (which are packed
per token); and two tokens would share a byte, so a middle of odd length, or slicing the store at a token, would
split bytes. Why halves and not neighbours (`2j`, `2j + 1`): the halves are contiguous, in the query and in a value
row's output, so neither the kernel's query loads nor its output stores are strided.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

BITS = (4, 8)
METADATA_DTYPE = torch.float16


class QuantizedKeys(NamedTuple):
    """Keys `[..., T, C]` quantized per channel over blocks of `block_size` consecutive tokens (block `i` holds tokens
    `[i * block_size, (i + 1) * block_size)`; the last block may hold fewer).

    Attributes:
        data: uint8 codes, `[..., T, C]` at 8 bits, `[..., T, ceil(C / 2)]` at 4 bits (packed as the module says).
        scales: `[..., ceil(T / block_size), C]` fp16 (`METADATA_DTYPE`), each block's step per channel.
        zeros: `[..., ceil(T / block_size), C]` fp16, each block's lowest grid value per channel: `x ≈ zeros + code *
            scales`.
        bits: 4 or 8.
        block_size: tokens per block.
    """

    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    block_size: int

    def tokens(self, start: int, stop: int) -> QuantizedKeys:
        """Tokens `[start, stop)` (views), `start` a multiple of `block_size`: its blocks start where this one's do."""
        if start % self.block_size:
            raise ValueError(
                f"a slice of quantized keys starts on a block boundary, got {start} (block_size {self.block_size})"
            )
        blocks = slice(start // self.block_size, -(-stop // self.block_size))
        return self._replace(
            data=self.data[..., start:stop, :], scales=self.scales[..., blocks, :], zeros=self.zeros[..., blocks, :]
        )


class QuantizedValues(NamedTuple):
    """Values `[..., T, D]` quantized per token in groups of `group_size` consecutive channels.

    Attributes:
        data: uint8 codes, `[..., T, D]` at 8 bits, `[..., T, ceil(D / 2)]` at 4 bits (packed as the module says).
        scales: `[..., T, D / group_size]` fp16 (`METADATA_DTYPE`), each token's step per group.
        zeros: `[..., T, D / group_size]` fp16, each token's lowest grid value per group.
        bits: 4 or 8.
        group_size: channels per group.
    """

    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def tokens(self, start: int, stop: int) -> QuantizedValues:
        """Tokens `[start, stop)` (views)."""
        tokens = slice(start, stop)
        return self._replace(
            data=self.data[..., tokens, :], scales=self.scales[..., tokens, :], zeros=self.zeros[..., tokens, :]
        )


def check_bits(bits: int) -> int:
    """The largest code, `2**bits - 1`, for supported `bits`; a ValueError naming them otherwise."""
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported: use 8 (1 byte per element) or 4 (two elements per byte)")
    return (1 << bits) - 1


def quantize_keys(keys: torch.Tensor, bits: int, block_size: int, valid: torch.Tensor | None = None) -> QuantizedKeys:
    """Quantize keys `[..., T, C]` per channel over blocks of `block_size` tokens (KIVI's key recipe).

    Args:
        keys: `[..., T, C]` in any float dtype; e.g. a middle-key store's `[B, chunks, T, chunk]`.
        bits: 4 or 8.
        block_size: tokens per block; blocks start at token 0, so a caller that appends to a store quantizes from a
            block boundary on.
        valid: bool, broadcastable to `[..., T]` (e.g. `[B, 1, T]` for a middle store); False for padding. Invalid
            tokens never widen a block's range (they may hold anything, NaN included) and get code 0. None: all real.
    """
    levels = check_bits(bits)
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    *lead, tokens, channels = keys.shape
    blocks = -(-tokens // block_size)
    pad = blocks * block_size - tokens
    flags = F.pad(_flags(valid, keys), (0, pad)).view(*lead, blocks, block_size, 1)
    x = F.pad(keys.float(), (0, 0, 0, pad)).view(*lead, blocks, block_size, channels)
    codes, scales, zeros = _quantize_groups(x, flags, -2, levels)
    codes = codes.view(*lead, blocks * block_size, channels)[..., :tokens, :]
    return QuantizedKeys(_pack(codes, bits), scales, zeros, bits, block_size)


def quantize_values(
    values: torch.Tensor, bits: int, group_size: int, valid: torch.Tensor | None = None
) -> QuantizedValues:
    """Quantize values `[..., T, D]` per token in groups of `group_size` channels (KIVI's value recipe).

    Args:
        values: `[..., T, D]` in any float dtype; e.g. a middle-value store's `[B, Hv, T, D]`.
        bits: 4 or 8.
        group_size: channels per group; must divide `D`.
        valid: bool, broadcastable to `[..., T]`; invalid tokens get code 0 and zero scales (they may hold anything).
    """
    levels = check_bits(bits)
    *lead, tokens, dim = values.shape
    if group_size < 1 or dim % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the values' head_dim {dim}: pick a divisor of {dim}, e.g. "
            f"{dim & -dim if dim else 1} (smaller groups follow each token's range more closely and cost more scales)"
        )
    flags = _flags(valid, values)[..., None, None]
    x = values.float().view(*lead, tokens, dim // group_size, group_size)
    codes, scales, zeros = _quantize_groups(x, flags, -1, levels)
    return QuantizedValues(_pack(codes.view(*lead, tokens, dim), bits), scales, zeros, bits, group_size)


def dequantize_keys(quantized: QuantizedKeys) -> torch.Tensor:
    """fp32 keys `[..., T, C]` back from `quantize_keys`: `zero + code * scale` (for tests and the reference; the
    decode kernel does this in registers)."""
    data, scales, zeros, bits, block_size = quantized
    codes = _unpack(data, bits, scales.shape[-1])
    tokens = codes.shape[-2]
    scales = scales.float().repeat_interleave(block_size, dim=-2)[..., :tokens, :]
    zeros = zeros.float().repeat_interleave(block_size, dim=-2)[..., :tokens, :]
    return zeros + codes.float() * scales


def dequantize_values(quantized: QuantizedValues) -> torch.Tensor:
    """fp32 values `[..., T, D]` back from `quantize_values` (for tests and the reference)."""
    data, scales, zeros, bits, group_size = quantized
    codes = _unpack(data, bits, scales.shape[-1] * group_size)
    scales, zeros = scales.float().repeat_interleave(group_size, -1), zeros.float().repeat_interleave(group_size, -1)
    return zeros + codes.float() * scales


def packed_width(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take along the packed axis."""
    return count if bits == 8 else (count + 1) // 2


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes `[..., n]` in `[0, 16)` as `[..., ceil(n / 2)]` bytes: byte `j` holds code `j` in its low nibble
    and code `j + ceil(n / 2)` in its high nibble (0 where that is past `n`)."""
    half = (codes.shape[-1] + 1) // 2
    low, high = codes[..., :half], codes[..., half:]
    high = F.pad(high, (0, half - high.shape[-1]))
    return low | (high << 4)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` uint8 codes `[..., count]` that `pack_int4` packed into `packed` `[..., ceil(count / 2)]`."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)[..., :count]


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int4(codes) if bits == 4 else codes


def _unpack(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    return unpack_int4(data, count) if bits == 4 else data


def _flags(valid: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`valid` as a bool tensor of `x.shape[:-1]` (all True for None)."""
    if valid is None:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    return valid.to(device=x.device, dtype=torch.bool).expand(x.shape[:-1])


def _quantize_groups(
    x: torch.Tensor, valid: torch.Tensor, dim: int, levels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes of fp32 `x` (its shape), and the scales and zeros of the groups along `dim` (that axis dropped),
    over the elements that `valid` (broadcastable to `x`) flags."""
    low = torch.where(valid, x, torch.inf).amin(dim, keepdim=True)
    high = torch.where(valid, x, -torch.inf).amax(dim, keepdim=True)
    empty = low > high  # no valid element: a grid at 0 with step 0
    low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    scales, zeros = _grid(low, high, levels, METADATA_DTYPE)
    scale, zero = scales.float(), zeros.float()
    # A group whose elements are all equal (and fp16-representable) gets step 0: every code is 0, no division by it.
    steps = (torch.where(valid, x, zero) - zero) / torch.where(scale > 0, scale, 1.0)
    codes = steps.round_().clamp_(0, levels).to(torch.uint8)
    return codes, scales.squeeze(dim), zeros.squeeze(dim)


def _grid(low: torch.Tensor, high: torch.Tensor, levels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros in `dtype` of groups spanning fp32 `[low, high]`: the zero rounded down and the scale up, so
    that `[zero, zero + levels * scale]` still covers `[low, high]` (saturating at `dtype`'s largest finite value)."""
    limit = torch.finfo(dtype).max
    zeros = _rounded(low.clamp(-limit, limit), dtype, down=True)
    span = (high.clamp(-limit, limit) - zeros.float()).clamp_(min=0.0)
    scales = _rounded(span / levels, dtype, down=False).clamp_(max=limit)
    return scales, zeros


def _rounded(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """fp32 `x` in `dtype`, rounded down (toward -inf) or up instead of to nearest."""
    rounded = x.to(dtype)
    wrong_side = rounded.float() > x if down else rounded.float() < x
    toward = torch.full_like(rounded, -torch.inf if down else torch.inf)
    return torch.where(wrong_side, torch.nextafter(rounded, toward), rounded)
