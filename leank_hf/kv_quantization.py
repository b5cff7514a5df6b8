"""`KVQuantization`: how many bits a LeanK cache stores its middle tokens in, and the one home of those defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from .kernels.quantization import BITS

# Value channels per scale and zero unless told otherwise (transformers' QuantizedCache's default too); 64 of a
# head's 128 channels cost 0.0625 bytes per channel in fp16 scales and zeros.
DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class KVQuantization:
    """Low-bit storage of the middle tokens (those between the sink and the recent window; see `quantization.py` in
    `leank_hf.kernels` for the scheme, KIVI's): keys per channel over each block of `block_size` tokens, values per
    token in groups of `q_group_size` channels, asymmetric, with fp16 scales and zeros. The sink and the recent window
    stay in the model's dtype.

    In the words of transformers' `QuantizedCache`: `nbits` is `kv_bits`, `q_group_size` is `q_group_size` (here for
    the values; keys take one scale per channel per block of `block_size` tokens, the window's flush), and
    `residual_length` is `sink + recent`, the tokens kept in the model's dtype (here at both ends of a row).

    Raises:
        ValueError: naming the field and the fix, for a value out of range.
    """

    kv_bits: int | None = field(
        default=None,
        metadata={"help": "store the middle tokens in 8 or 4 bits (unset: the model's dtype)", "choices": [4, 8]},
    )
    q_group_size: int | None = field(
        default=None,
        metadata={
            "help": "value channels per scale and zero when quantized; must divide head_dim (unset: 64, or the "
            "largest power of two dividing head_dim where that is less)"
        },
    )

    def __post_init__(self) -> None:
        if self.kv_bits is not None and (isinstance(self.kv_bits, bool) or self.kv_bits not in BITS):
            raise ValueError(
                f"kv_bits={self.kv_bits!r} is not supported: use 8 (1 byte per element), 4 (two elements per byte), "
                "or None to keep the middle in the model's dtype"
            )
        size = self.q_group_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1 or size & (size - 1)):
            raise ValueError(f"q_group_size must be a power of two (e.g. 32, 64 or 128), got {size!r}")

    def group_size(self, head_dim: int) -> int:
        """Value channels per scale for a model of `head_dim`; a ValueError naming the fix if `q_group_size` does not
        divide it."""
        if self.q_group_size is None:
            return min(DEFAULT_GROUP_SIZE, head_dim & -head_dim)
        if head_dim % self.q_group_size:
            raise ValueError(
                f"q_group_size={self.q_group_size} does not divide this model's head_dim {head_dim}: values are "
                f"quantized in groups of q_group_size channels of a head; use {min(head_dim & -head_dim, 64)} or "
                "another power of two that divides it (or leave it unset)"
            )
        return self.q_group_size

    def middle_bytes(
        self, kept_channels: int, value_channels: int, head_dim: int, block_size: int, element_size: int
    ) -> float:
        """Bytes a middle token takes on average: its `kept_channels` key channels and `value_channels` value channels
        (those of heads that keep a key channel), scales and zeros included."""
        if self.kv_bits is None:
            return (kept_channels + value_channels) * element_size
        code = self.kv_bits / 8
        return kept_channels * (code + 4 / block_size) + value_channels * (code + 4 / self.group_size(head_dim))


DEFAULT_KV_QUANTIZATION = KVQuantization()
