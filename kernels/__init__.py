"""LeanK decode kernels (installed as `leank_hf.kernels`): plain tensors in, plain tensors out, no HF types."""

from __future__ import annotations

import torch

from .layout import ChannelLayout, PrunedKV
from .reference import leank_attention_reference


def leank_attention(query: torch.Tensor, cache: PrunedKV, scaling: float) -> torch.Tensor:
    """LeanK attention of `query` `[B, Hq, Q, D]` over `cache`: the Triton kernel on CUDA where it applies, else the
    PyTorch reference (CPU, fp32, multi-token steps). Same semantics either way (see `leank_attention_reference`)."""
    if query.is_cuda:
        from .decode import leank_decode_triton, supports

        if supports(query, cache):
            return leank_decode_triton(query, cache, scaling)
    return leank_attention_reference(query, cache, scaling)


__all__ = ["ChannelLayout", "PrunedKV", "leank_attention", "leank_attention_reference"]
