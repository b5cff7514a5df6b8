"""LeanK attention as a PyTorch custom operator, so that `torch.compile` can capture a decode step in a CUDA graph.

The operator takes the cache as plain tensors (a compiled graph can hold no Python object) and names its layer's
`ChannelLayout` by an int from `register_layout`. Equal masks on one device share one layout and one int, so a new
cache for the same masks compiles nothing new. Inside, it is `LeanKAttention`: the Triton kernel on CUDA, the PyTorch
reference elsewhere.
"""

from __future__ import annotations

import torch

from . import LeanKAttention
from .layout import ChannelLayout, PrunedKV

_LAYOUTS: list[ChannelLayout] = []
_ATTENTION: list[LeanKAttention] = []  # one per layout: keeps its decoder's launch set-up
_KEYS: dict[tuple, int] = {}


def register_layout(mask: torch.Tensor, device: torch.device) -> tuple[int, ChannelLayout]:
    """(the int naming this mask's layout on `device` for `pruned_attention`, the layout), built once per mask."""
    mask = mask.bool().cpu()
    key = (str(device), tuple(mask.shape), mask.numpy().tobytes())
    if key not in _KEYS:
        _KEYS[key] = len(_LAYOUTS)
        _LAYOUTS.append(ChannelLayout.from_mask(mask, device))
        _ATTENTION.append(LeanKAttention())
    index = _KEYS[key]
    return index, _LAYOUTS[index]


@torch.library.custom_op("leank_hf::pruned_attention", mutates_args=())
def pruned_attention(
    query: torch.Tensor,
    sink_keys: torch.Tensor,
    sink_values: torch.Tensor,
    sink_lengths: torch.Tensor,
    middle_keys: torch.Tensor,
    middle_values: torch.Tensor,
    middle_valid: torch.Tensor,
    middle_start: torch.Tensor,
    middle_length: torch.Tensor,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    recent_valid: torch.Tensor,
    layout: int,
    scaling: float,
) -> torch.Tensor:
    """`LeanKAttention` over the `PrunedKV` these tensors make, with the layout `register_layout` named `layout`.

    The middle tensors are the stores' whole capacity and `middle_length` the stored length, so every shape stays
    fixed from step to step."""
    cache = PrunedKV(
        sink_keys, sink_values, sink_lengths, middle_keys, middle_values, middle_valid, middle_start, recent_keys,
        recent_values, recent_valid, _LAYOUTS[layout], middle_length,
    )  # fmt: skip
    return _ATTENTION[layout](query, cache, scaling)


@pruned_attention.register_fake
def _(query: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(query)
