"""`LeanKAttention`: where a layer's attention runs, the Triton decode kernel or the PyTorch reference.

The kernel's module is imported on first use, so that the package imports without Triton (an optional dependency: the
CPU path needs none).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from types import ModuleType

import torch

from .layout import NewTokens, PrunedKV, QuantizedPrunedKV
from .reference import leank_attention_reference


class LeanKAttention:
    """LeanK attention of one layer, step after step: the Triton decode kernel where it applies (see
    `kernel_devices` and `decode.supports`), else the PyTorch reference (CPU, fp32, multi-token steps). Same semantics
    either way (see `leank_attention_reference`), whether the middle is stored in the model's dtype (`PrunedKV`) or
    quantized (`QuantizedPrunedKV`: the kernel dequantizes it in registers, the reference in fp32).

    It keeps the layer's `LeanKDecoder`, so the kernel's launch set-up is paid once per layer, not once per step.
    """

    # Devices whose tensors go to the Triton kernel; tests add "cpu" to run it in Triton's interpreter.
    kernel_devices: tuple[str, ...] = ("cuda",)

    def __init__(self) -> None:
        self._decoder = None

    def __deepcopy__(self, memo: dict) -> LeanKAttention:
        return LeanKAttention()  # launch state is only a cache: a copied cache layer builds its own

    def __call__(
        self, query: torch.Tensor, cache: PrunedKV | QuantizedPrunedKV, scaling: float, new: NewTokens | None = None,
        cache_version: Hashable | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Attention of `query` `[B, Hq, Q, D]` over `cache`; `[B, Hq, Q, D]` in the query dtype.

        With `new`, the window's last `Q` slots are this step's tokens, not yet written: they are written first (by
        the kernel itself where it can). `cache_version`: see `LeanKDecoder`.
        """
        if query.device.type in self.kernel_devices:
            decode = _decode_launcher()
            if decode.supports(query, cache):
                if new is not None and not decode.takes_new_tokens(new, cache):
                    new.write(cache)
                    new = None
                if self._decoder is None:
                    self._decoder = decode.LeanKDecoder()
                return self._decoder(query, cache, scaling, new, cache_version)
        if new is not None:
            new.write(cache)
        return leank_attention_reference(query, cache, scaling)


@functools.cache
def _decode_launcher() -> ModuleType:
    """The Triton kernels' launcher module, imported on first use: Triton is an optional dependency on the CPU."""
    from . import decode

    return decode


def leank_attention(query: torch.Tensor, cache: PrunedKV | QuantizedPrunedKV, scaling: float) -> torch.Tensor:
    """`LeanKAttention` for a single call."""
    return LeanKAttention()(query, cache, scaling)
