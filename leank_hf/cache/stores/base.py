"""`LeanKStore`: what a `LeanKLayer` hands every call to, one layer's stored tokens and the steps that change them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

import torch

from ...kernels import ChannelLayout, PrunedKV
from ...memory import LayerMemory

# Why a step's keys did not reach LeanK's attention, and the fix: for errors of the layer and its stores.
NOT_LEANK_ATTENTION = (
    "a LeanKCache handed its keys to an attention function other than LeanK's. The model's attn_implementation "
    "must be 'leank' while a LeanKCache is in use: build the cache with LeanKCache(masks, model) or "
    "LeanKCache.from_pretrained(repo, model), which sets it, and do not change it afterwards."
)


class Step(Protocol):
    """A step's new keys and values `[B, H, Q, D]`, staged by the layer (a `PendingStep`)."""

    keys: torch.Tensor
    values: torch.Tensor


class LeanKStore(ABC):
    """One layer's stored tokens: per row, a sink of its first real tokens and a recent window at full width, and
    the tokens between them (the middle) on their kept key channels only, all read by attention as a `PrunedKV`.

    The layer (what transformers sees) holds one store and hands it every call, so that how tokens are stored is
    the store's business alone. Siblings: `GrowableStore` (stores grow as tokens come; eager steps, every `generate`
    feature) and `FixedStore` (fixed shapes, lengths counted on the device; steps `torch.compile` captures). A store
    that keeps its middle some other way (quantized, say) is another sibling.

    Attributes:
        tokens: tokens per row, padding included, this step's among them: a host int, or a 0-d tensor on the device
            where steps count there (as a `StaticLayer`'s `get_seq_length` returns it).
        stored_tokens: on the host, tokens per row stored before the staged step (0: the next step is a prefill); a
            store that counts on the device gives those it was made with.
        batch_size: rows.
        layout: the layer's `ChannelLayout`.
    """

    tokens: int | torch.Tensor
    stored_tokens: int
    batch_size: int
    layout: ChannelLayout

    @abstractmethod
    def stage(self, step: Step) -> None:
        """Take note of a step the layer hands to attention, which then calls `attend` or `commit` with it."""

    @abstractmethod
    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        """`CacheLayerMixin.get_mask_sizes`: the attention mask's key length and offset for a step."""

    @abstractmethod
    def attend(self, query: torch.Tensor, step: Step, valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Store `step`'s tokens and return the pruned attention `[B, Hq, Q, D]` of `query` `[B, Hq, Q, D]` over the
        stored tokens and these; `valid` `[B, Q]` is False for padding (None: all real)."""

    @abstractmethod
    def commit(self, step: Step, valid: torch.Tensor | None) -> None:
        """Store the tokens of a step whose attention ran elsewhere (the prefill, with the model's exact attention)."""

    @abstractmethod
    def view(self) -> PrunedKV:
        """The stored tokens as plain tensors, as the attention kernels read them."""

    @abstractmethod
    def crop(self, count: int) -> None:
        """Forget the latest `count` (> 0) tokens of every row, or say why they cannot go."""

    @abstractmethod
    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the rows (beam search): row `i` becomes what row `beam_idx[i]` was."""

    @abstractmethod
    def resize_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a transform of the batch axis that may change its size (repeat, select) to every stored tensor."""

    @abstractmethod
    def memory(self, layer_idx: int) -> LayerMemory:
        """Bytes held, and what the stock layer would hold for the same tokens."""
