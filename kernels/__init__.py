"""LeanK decode kernels (installed as `leank_hf.kernels`): plain tensors in, plain tensors out, no HF types."""

from .layout import ChannelLayout, PrunedKV
from .reference import leank_attention_reference

__all__ = ["ChannelLayout", "PrunedKV", "leank_attention_reference"]
