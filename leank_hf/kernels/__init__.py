"""LeanK decode kernels (installed as `leank_hf.kernels`): plain tensors in, plain tensors out, no HF types.

`layout.py` describes a layer's pruned store (`quantization.py` the low-bit form of its middle), `reference.py` is
the PyTorch path, `decode.py` launches the Triton kernels of `decode_kernels.py` (Triton's internals only through
`triton_gate.py`), `dispatch.py` picks between them, and `compiled.py` wraps that as a torch custom operator.
"""

from .dispatch import LeanKAttention, leank_attention
from .layout import ChannelLayout, NewTokens, PrunedKV, QuantizedPrunedKV
from .reference import leank_attention_reference

__all__ = [
    "ChannelLayout",
    "LeanKAttention",
    "NewTokens",
    "PrunedKV",
    "QuantizedPrunedKV",
    "leank_attention",
    "leank_attention_reference",
]
