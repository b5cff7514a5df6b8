"""LeanK decode kernels (installed as `leank_hf.kernels`): plain tensors in, plain tensors out, no HF types."""

from __future__ import annotations

import torch

from .layout import ChannelLayout, PrunedKV
from .reference import leank_attention_reference


class LeanKAttention:
    """LeanK attention of one layer, step after step: the Triton decode kernel on CUDA where it applies, else the
    PyTorch reference (CPU, fp32, multi-token steps). Same semantics either way (see `leank_attention_reference`).

    It keeps the layer's `LeanKDecoder`, so the kernel's launch set-up is paid once per layer, not once per step.
    """

    def __init__(self) -> None:
        self._decoder = None

    def __deepcopy__(self, memo: dict) -> LeanKAttention:
        return LeanKAttention()  # launch state is only a cache: a copied cache layer builds its own

    def __call__(self, query: torch.Tensor, cache: PrunedKV, scaling: float) -> torch.Tensor:
        """Attention of `query` `[B, Hq, Q, D]` over `cache`; `[B, Hq, Q, D]` in the query dtype."""
        if query.is_cuda:
            from .decode import LeanKDecoder, supports

            if supports(query, cache):
                if self._decoder is None:
                    self._decoder = LeanKDecoder()
                return self._decoder(query, cache, scaling)
        return leank_attention_reference(query, cache, scaling)


def leank_attention(query: torch.Tensor, cache: PrunedKV, scaling: float) -> torch.Tensor:
    """`LeanKAttention` for a single call."""
    return LeanKAttention()(query, cache, scaling)


__all__ = ["ChannelLayout", "LeanKAttention", "PrunedKV", "leank_attention", "leank_attention_reference"]
