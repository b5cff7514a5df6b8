"""LeanK attention as a PyTorch custom operator, so that `torch.compile` can capture a decode step in a CUDA graph.

The operator takes the cache as plain tensors (a compiled graph can hold no Python object) and names its layer's
`ChannelLayout` by an int from `register_layout`. Equal masks on one device get the same int, so a new cache for the
same masks compiles nothing new. Inside, it is `LeanKAttention`: the Triton kernel on CUDA, the PyTorch reference
elsewhere.

The layouts (index tensors on the device) live as long as a cache layer holds their `RegisteredLayout`; only the
small map from mask content to int outlives them, and it is bounded.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections import OrderedDict

import torch

from .dispatch import LeanKAttention
from .layout import ChannelLayout, PrunedKV, QuantizedPrunedKV

# Distinct masks whose int is remembered after their caches are gone (so a later cache for one of them reuses the
# graphs compiled for it); the oldest are forgotten first.
_REMEMBERED_MASKS = 1024


class RegisteredLayout:
    """A mask's layout on a device, the int `pruned_attention` knows it by, and the `LeanKAttention` that keeps its
    decoder's launch set-up. Held by the cache layers that use it; freed with the last of them."""

    __slots__ = ("__weakref__", "attention", "index", "layout")

    def __init__(self, index: int, layout: ChannelLayout) -> None:
        self.index, self.layout, self.attention = index, layout, LeanKAttention()

    def __deepcopy__(self, memo: dict) -> RegisteredLayout:
        return self  # shared by every layer of these masks on this device; a copied cache layer holds it too


_REGISTERED: weakref.WeakValueDictionary[int, RegisteredLayout] = weakref.WeakValueDictionary()
_INDICES: OrderedDict[tuple[str, tuple[int, ...], str], int] = OrderedDict()
_NEXT_INDEX = itertools.count()


def register_layout(mask: torch.Tensor, device: torch.device) -> RegisteredLayout:
    """The registered layout of `mask` `[kv_heads, head_dim]` on `device` (built once while any layer holds it)."""
    mask = mask.bool().cpu()
    key = (str(device), tuple(mask.shape), hashlib.sha256(mask.numpy().tobytes()).hexdigest())
    index = _INDICES.get(key)
    if index is None:
        _forget_unused_masks()
        index = _INDICES[key] = next(_NEXT_INDEX)
    _INDICES.move_to_end(key)
    registered = _REGISTERED.get(index)
    if registered is None:
        registered = _REGISTERED[index] = RegisteredLayout(index, ChannelLayout.from_mask(mask, device))
    return registered


def _forget_unused_masks() -> None:
    """Before a new mask is remembered: drop the oldest masks no cache holds, so that fewer than `_REMEMBERED_MASKS`
    are (those held stay, so that equal masks never get two ints while one is in use)."""
    unused = (key for key, index in _INDICES.items() if index not in _REGISTERED)
    for key in list(itertools.islice(unused, max(len(_INDICES) - _REMEMBERED_MASKS + 1, 0))):
        del _INDICES[key]


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
    key_scales: torch.Tensor | None = None,
    key_zeros: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
    value_zeros: torch.Tensor | None = None,
    bits: int = 0,
    block_size: int = 0,
    group_size: int = 0,
) -> torch.Tensor:
    """`LeanKAttention` over the `PrunedKV` these tensors make, with the layout `register_layout` named `layout`;
    with `key_scales`, the `QuantizedPrunedKV` whose middle codes are `middle_keys` and `middle_values` (its scales,
    zeros, `bits`, `block_size` and `group_size` given too).

    The middle tensors are the stores' whole capacity and `middle_length` the stored length, so every shape stays
    fixed from step to step."""
    registered = _REGISTERED[layout]  # alive: the calling cache layer holds it
    cache = PrunedKV(
        sink_keys, sink_values, sink_lengths, middle_keys, middle_values, middle_valid, middle_start, recent_keys,
        recent_values, recent_valid, registered.layout, middle_length,
    )  # fmt: skip
    if key_scales is not None:
        cache = QuantizedPrunedKV(cache, key_scales, key_zeros, value_scales, value_zeros, bits, block_size, group_size)
    return registered.attention(query, cache, scaling)


@pruned_attention.register_fake
def _(query: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(query)
