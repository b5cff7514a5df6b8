"""Token buffers that grow by amortised steps, and how many of their bytes hold tokens."""

from __future__ import annotations

import torch

# Growable stores grow by this share of their size: amortised O(1) copies per token, while capacity reserved but not
# yet used stays around 6 % of what is held. (A middle store whose pruning saves less than that grows by what it
# saves: `SinkAndMiddle`, so that no layer ever holds more than a `DynamicLayer` would.)
GROWTH_FRACTION = 1 / 16


def grown(tensor: torch.Tensor, dim: int, used: int, capacity: int) -> torch.Tensor:
    """`tensor` with room for at least `capacity` entries along `dim`, keeping the first `used` (itself if it has)."""
    if capacity <= tensor.shape[dim]:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = capacity
    bigger = tensor.new_empty(shape)
    bigger.narrow(dim, 0, used).copy_(tensor.narrow(dim, 0, used))
    return bigger


def live_bytes(tensor: torch.Tensor, dim: int, used: int) -> int:
    """Bytes of the first `used` entries of `tensor` along `dim` (the rest is capacity reserved for later tokens)."""
    return tensor.numel() // max(tensor.shape[dim], 1) * used * tensor.element_size()
