"""`LeanKLayer`: one layer of a LeanK cache as transformers sees it; its tokens live in a store (`stores`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from ..kernels import ChannelLayout, LeanKAttention, PrunedKV, QuantizedPrunedKV
from ..kv_quantization import DEFAULT_KV_QUANTIZATION, KVQuantization
from ..memory import LayerMemory
from .stores import NOT_LEANK_ATTENTION, GrowableStore, LeanKStore, PrunedMiddle, QuantizedMiddle


class PendingStep:
    """This step's new keys and values, handed by `LeanKLayer.update` to the LeanK attention function.

    The attention function stores them (`LeanKLayer.attend` as it attends, `commit` after the exact prefill),
    because only the attention mask it receives carries the padding of the new tokens.
    """

    __slots__ = ("keys", "layer", "values")

    def __init__(self, layer: LeanKLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.layer, self.keys, self.values = layer, keys, values

    def __getattr__(self, name: str):
        # Reached only for attributes a PendingStep lacks, e.g. `.shape` from a non-LeanK attention function.
        raise AttributeError(f"PendingStep has no attribute {name!r}: {NOT_LEANK_ATTENTION}")


class LeanKLayer(CacheLayerMixin):
    """One layer's LeanK cache.

    Per row, the first `sink` real tokens keep full keys and values; the latest tokens (the recent window, between
    `recent` and `recent + block_size - 1` of them) too; tokens in between keep only their kept key channels, and
    their values only for heads that keep at least one channel. Tokens leave the window `block_size` at a time.
    Left padding is tracked per row: padding never gets attention weight and never takes a sink slot.

    The tokens live in `store`, a `GrowableStore` from the first step on; the layer hands it every call.

    Args:
        channel_mask: `[kv_heads, head_dim]` bool, True = keep the key channel.
        sink: leading real tokens per row kept at full width.
        recent: latest tokens kept at full width.
        block_size: tokens moved out of the recent window at a time.
        quantization: how middle tokens are stored: in the model's dtype (`PrunedMiddle`), or with `kv_bits` as
            low-bit codes (`QuantizedMiddle`).
    """

    is_sliding = False
    is_compileable = False
    # Assisted decoding (transformers >= 5.24 checks this flag) rolls back a few draft tokens, which are still in the
    # full-width recent window; `crop` raises if asked for older, already pruned tokens.
    is_croppable = True

    def __init__(
        self, channel_mask: torch.Tensor, sink: int, recent: int, block_size: int,
        quantization: KVQuantization = DEFAULT_KV_QUANTIZATION,
    ) -> None:  # fmt: skip
        super().__init__()
        self.channel_mask = channel_mask.bool()
        self.sink, self.recent, self.block_size = sink, recent, block_size
        self.quantization = quantization
        self.attention = LeanKAttention()  # keeps the decode kernel's launch set-up from step to step
        self._clear()

    def _clear(self) -> None:
        self.is_initialized = False
        self.store: LeanKStore | None = None

    # ----------------------------------------------------------------------------------------------- HF API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        if (heads, head_dim) != tuple(self.channel_mask.shape):
            raise ValueError(
                f"this layer's LeanK mask covers {self.channel_mask.shape[0]} KV heads x {self.channel_mask.shape[1]} "
                f"channels, but the model produced keys for {heads} KV heads x {head_dim} channels; "
                "use masks made for this model"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = batch
        self.layout = self._build_layout()
        if self.quantization.kv_bits is None:
            middle = PrunedMiddle(self.layout, key_states)
        else:
            middle = QuantizedMiddle(self.layout, key_states, self.quantization, self.block_size)
        self.store = GrowableStore(
            key_states, self.layout, middle, self.sink, self.recent, self.block_size, self.attention
        )
        self.is_initialized = True

    def _build_layout(self) -> ChannelLayout:
        """The layout of this layer's mask on its device (once, at lazy initialisation)."""
        return ChannelLayout.from_mask(self.channel_mask, self.device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[PendingStep, PendingStep]:
        """Stage this step's post-RoPE keys/values `[B, H, Q, D]`; the LeanK attention function stores them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.batch_size:
            raise ValueError(
                f"this LeanKCache holds {self.batch_size} sequences but got a batch of {key_states.shape[0]}: a filled "
                "cache cannot be reused with another batch size. Use a fresh cache (LeanKCache.from_pretrained(...) "
                "returns a new one each call) or call cache.reset() first."
            )
        step = PendingStep(self, key_states, value_states)
        self.store.stage(step)
        return step, step

    def get_seq_length(self) -> int | torch.Tensor:
        """Tokens stored per row, padding included (a 0-d device tensor once a `FixedStore` holds them)."""
        return self.store.tokens if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.mask_sizes(query_length) if self.is_initialized else (query_length, 0)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int | torch.Tensor) -> None:
        """Remove the last `-tokens_to_remove` tokens; only tokens still in the full-width recent window can go.

        Assisted decoding in some transformers versions passes a 0-d tensor: it is read as an int, so that lengths
        stay host ints (a tensor would be changed in place by later `+=` and `-=`)."""
        tokens_to_remove = int(tokens_to_remove)
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove}; to keep the first N tokens "
                "call crop(N - cache.get_seq_length())"
            )
        if tokens_to_remove and self.is_initialized:
            self.store.crop(-tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.store.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._resize_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._resize_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def _resize_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.is_initialized:
            self.store.resize_batch(fn)
            self.batch_size = self.store.batch_size

    def offload(self) -> None:
        raise NotImplementedError("LeanKCache does not support offloading its layers to the CPU")

    def prefetch(self) -> None:
        raise NotImplementedError("LeanKCache does not support offloading its layers to the CPU")

    # ------------------------------------------------------------------------- LeanK attention and memory
    @property
    def stored_tokens(self) -> int:
        """Tokens stored before the pending step, on the host (0 means the next attention is a prefill)."""
        return self.store.stored_tokens

    def view(self) -> PrunedKV | QuantizedPrunedKV:
        """The stored tokens as plain tensors (live slices, no copies)."""
        return self.store.view()

    def attend(
        self, query: torch.Tensor, step: PendingStep, valid: torch.Tensor | None, scaling: float
    ) -> torch.Tensor:
        """Pruned attention `[B, Hq, Q, D]` of `query` `[B, Hq, Q, D]` over the stored tokens and `step`'s own, which
        are stored as attention reads them. `valid` `[B, Q]` is False for padding (None = all real)."""
        return self.store.attend(query, step, valid, scaling)

    def commit(self, step: PendingStep, valid: torch.Tensor | None) -> None:
        """Store a step whose attention ran elsewhere (the exact prefill)."""
        self.store.commit(step, valid)

    def memory(self, layer_idx: int) -> LayerMemory:
        """Bytes this layer holds, and what the stock layer would hold for the same tokens."""
        if not self.is_initialized:
            return LayerMemory(layer_idx, "leank", 0, 0, 0, 0, 0)
        return self.store.memory(layer_idx)
