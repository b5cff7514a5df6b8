"""`StaticLeanKLayer`: a LeanK layer whose decode steps `torch.compile` can capture in a CUDA graph."""

from __future__ import annotations

import torch

from ..kernels import ChannelLayout
from ..kernels.compiled import register_layout
from ..kv_quantization import DEFAULT_KV_QUANTIZATION, KVQuantization
from .layer import LeanKLayer, PendingStep
from .stores import FixedStore


class StaticLeanKLayer(LeanKLayer):
    """A `LeanKLayer` whose decode steps keep every shape fixed and every length on the device, so that `generate`'s
    compiled decoding (`torch.compile`, CUDA graphs) captures them; eager decoding on the host is what limits
    `LeanKLayer` at small batches.

    The prefill runs as in `LeanKLayer`, into a `GrowableStore`; the layer then moves its tokens into a `FixedStore`,
    sized by `max_cache_len`, which takes every later step (see it for what that needs).

    Args:
        channel_mask, sink, recent, block_size, quantization: as `LeanKLayer`.
        max_cache_len: the most tokens a row will hold (prompt and new tokens).
    """

    is_compileable = True
    is_croppable = False  # fixed-size stores are written in place: nothing is kept to roll back to

    def __init__(
        self, channel_mask: torch.Tensor, sink: int, recent: int, block_size: int, max_cache_len: int,
        quantization: KVQuantization = DEFAULT_KV_QUANTIZATION,
    ) -> None:  # fmt: skip
        super().__init__(channel_mask, sink, recent, block_size, quantization)
        self.max_cache_len = max_cache_len

    def _build_layout(self) -> ChannelLayout:
        # The shared layout of these masks on this device, named by an int the compiled operator can hold.
        self._registered = register_layout(self.channel_mask, self.device)
        return self._registered.layout

    def get_max_length(self) -> int:
        return self.max_cache_len

    def commit(self, step: PendingStep, valid: torch.Tensor | None) -> None:
        super().commit(step, valid)
        self.store = FixedStore(self.store, self.max_cache_len, self._registered)
