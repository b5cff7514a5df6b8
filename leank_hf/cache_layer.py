"""`LeanKLayer`: one layer's pruned KV store (sink, pruned middle, full-width recent window)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from .kernels import ChannelLayout, LeanKAttention, NewTokens, PrunedKV
from .memory import LayerMemory, held_bytes

# The middle stores grow by this share of their size: amortised O(1) copies per token, while capacity reserved but
# not yet used stays around 6 % of what is held. A layer whose pruning saves less than that grows by what it saves
# (`LeanKLayer._middle_growth`), so that no layer ever holds more than a `DynamicLayer` would.
_GROWTH_FRACTION = 1 / 16

# Versions of a layer's stores, for the decode kernel's launch cache: unique across layers and resets.
_STORE_VERSIONS = itertools.count()

# Every tensor a layer stores, each with the batch as its first axis.
_STORE_NAMES = (
    "sink_keys", "sink_values", "sink_lengths", "middle_keys", "middle_values", "middle_valid", "middle_start",
    "recent_keys", "recent_values", "recent_valid",
)  # fmt: skip

_NOT_LEANK_ATTENTION = (
    "a LeanKCache handed its keys to an attention function other than LeanK's. The model's attn_implementation "
    "must be 'leank' while a LeanKCache is in use: build the cache with LeanKCache(masks, model) or "
    "LeanKCache.from_pretrained(repo, model), which sets it, and do not change it afterwards."
)


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
        raise AttributeError(f"PendingStep has no attribute {name!r}: {_NOT_LEANK_ATTENTION}")


class LeanKLayer(CacheLayerMixin):
    """One layer's LeanK cache.

    Per row, the first `sink` real tokens keep full keys and values; the latest tokens (the recent window, between
    `recent` and `recent + block_size - 1` of them) too; tokens in between keep only their kept key channels, and
    their values only for heads that keep at least one channel. Tokens leave the window `block_size` at a time.
    Left padding is tracked per row: padding never gets attention weight and never takes a sink slot.

    Args:
        channel_mask: `[kv_heads, head_dim]` bool, True = keep the key channel.
        sink: leading real tokens per row kept at full width.
        recent: latest tokens kept at full width.
        block_size: tokens moved out of the recent window at a time.
    """

    is_sliding = False
    is_compileable = False
    # Assisted decoding (transformers >= 5.24 checks this flag) rolls back a few draft tokens, which are still in the
    # full-width recent window; `crop` raises if asked for older, already pruned tokens.
    is_croppable = True

    def __init__(self, channel_mask: torch.Tensor, sink: int, recent: int, block_size: int) -> None:
        super().__init__()
        self.channel_mask = channel_mask.bool()
        self.sink, self.recent, self.block_size = sink, recent, block_size
        # The window holds at most `recent + block_size - 1` tokens between steps, `recent + block_size` while a
        # decode step attends.
        self._window_capacity = recent + block_size
        self.attention = LeanKAttention()  # keeps the decode kernel's launch set-up from step to step
        self._clear()

    def _clear(self) -> None:
        self.is_initialized = False
        self.seq_len = 0
        self._pending: PendingStep | None = None
        self._window = 0  # tokens in the recent window
        self._middle = 0  # stored middle columns
        self._sink_slots = 0  # max filled sink slots over the rows
        self.sink_keys = self.sink_values = self.sink_lengths = None
        self.middle_keys = self.middle_values = self.middle_valid = self.middle_start = None
        self._middle_has_holes = False
        self._has_flushed = False  # some tokens have left the window: the row is long, the window full-size
        self.recent_keys = self.recent_values = self.recent_valid = None
        # Host-side knowledge that lets a flush skip reading its decisions back from the GPU:
        self._sinks_full = self.sink == 0  # every row's sink holds `sink` tokens
        self._real_run = 0  # the latest tokens stored without padding flags (the window's, if >= its length)
        self._stores_changed(window=True)

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
        self._middle_growth = _middle_growth(self.layout, heads, head_dim)
        kv_kwargs = {"dtype": self.dtype, "device": self.device}
        self.sink_keys = torch.zeros(batch, heads, 0, head_dim, **kv_kwargs)
        self.sink_values = torch.zeros(batch, heads, 0, head_dim, **kv_kwargs)
        self.sink_lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.middle_keys = torch.empty(self.layout.middle_key_shape(batch, 0), **kv_kwargs)
        self.middle_values = torch.empty(batch, len(self.layout.value_heads), 0, head_dim, **kv_kwargs)
        self.middle_valid = torch.empty(batch, 0, dtype=torch.bool, device=self.device)
        self.middle_start = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.recent_keys = torch.empty(batch, heads, 0, head_dim, **kv_kwargs)
        self.recent_values = torch.empty(batch, heads, 0, head_dim, **kv_kwargs)
        self.recent_valid = torch.empty(batch, 0, dtype=torch.bool, device=self.device)
        self._stores_changed(window=True)
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
        else:
            self._check_batch(key_states.shape[0])
        if self._pending is not None:
            raise RuntimeError(
                f"LeanKLayer.update was called twice without attention in between: {_NOT_LEANK_ATTENTION}"
            )
        self._pending = PendingStep(self, key_states, value_states)
        self.seq_len += key_states.shape[2]
        return self._pending, self._pending

    def _check_batch(self, batch: int) -> None:
        if batch != self.batch_size:
            raise ValueError(
                f"this LeanKCache holds {self.batch_size} sequences but got a batch of {batch}: a filled cache cannot "
                "be reused with another batch size. Use a fresh cache (LeanKCache.from_pretrained(...) returns a new "
                "one each call) or call cache.reset() first."
            )

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

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
        count = -tokens_to_remove
        if count == 0 or not self.is_initialized:
            return
        if count > self._window:
            raise ValueError(
                f"LeanKCache can only roll back tokens still in its full-width recent window ({self._window} now); "
                f"{count} were asked. Older tokens were already pruned. Use a larger `recent`, or a DynamicCache for "
                "decoding strategies that roll back further."
            )
        self._window -= count
        self._real_run = max(0, self._real_run - count)
        self.seq_len -= count

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self) -> None:
        raise NotImplementedError("LeanKCache does not support offloading its layers to the CPU")

    def prefetch(self) -> None:
        raise NotImplementedError("LeanKCache does not support offloading its layers to the CPU")

    # -------------------------------------------------------------------------------------- LeanK storage
    @property
    def stored_tokens(self) -> int:
        """Tokens stored before the pending step (0 means the next attention is a prefill)."""
        pending = self._pending.keys.shape[2] if self._pending is not None else 0
        return self.seq_len - pending

    @property
    def stores_version(self) -> int:
        """Changes whenever a store is replaced or the sink/middle change (what `LeanKDecoder` calls its
        `cache_version`)."""
        return self._stores_version

    def view(self) -> PrunedKV:
        """The stored tokens as plain tensors (live slices, no copies).

        Eager decoding calls this for every layer at every step, so the slices are kept until the stores change: the
        sink and middle ones until the next flush, the window's per window length."""
        stored = self._stored_view
        if stored is None:
            sink, middle = self._sink_slots, self._middle
            stored = self._stored_view = (
                self.sink_keys.narrow(2, 0, sink), self.sink_values.narrow(2, 0, sink), self.sink_lengths,
                self.middle_keys.narrow(2, 0, middle), self.middle_values.narrow(2, 0, middle),
                self.middle_valid.narrow(1, 0, middle), None if self._middle_has_holes else self.middle_start,
            )  # fmt: skip
        window = self._window_views.get(self._window)
        if window is None:
            length = self._window
            window = self._window_views[length] = (
                self.recent_keys.narrow(2, 0, length), self.recent_values.narrow(2, 0, length),
                self.recent_valid.narrow(1, 0, length),
            )  # fmt: skip
        return PrunedKV(*stored, *window, self.layout)

    def attend(
        self, query: torch.Tensor, step: PendingStep, valid: torch.Tensor | None, scaling: float
    ) -> torch.Tensor:
        """Pruned attention of `query` `[B, Hq, Q, D]` over the stored tokens and `step`'s own, which go to the end of
        the recent window as attention reads them (the decode kernel writes them itself); then the window gives up
        its oldest tokens if it is full (`settle`). `valid` `[B, Q]` is False for padding (None = all real)."""
        self._take(step)
        self._open_window_slots(step.keys.shape[2], valid)
        new = NewTokens(step.keys, step.values, valid)
        output = self.attention(query, self.view(), scaling, new, self._stores_version)
        self.settle()
        return output

    def settle(self) -> None:
        """After attention: once the window reaches `recent + block_size`, all but its latest `recent` tokens leave."""
        if self._window < self.recent + self.block_size:
            return
        leaving = self._window - self.recent
        all_real = self._real_run >= self._window  # every token in the window was stored without padding flags
        self._flush(
            self.recent_keys[:, :, :leaving], self.recent_values[:, :, :leaving],
            None if all_real else self.recent_valid[:, :leaving],
        )  # fmt: skip
        # Keep the latest `recent` tokens at the front, in a buffer no larger than the window ever needs between
        # steps (a long chunked-prefill step may have grown it).
        shrinks = self.recent_keys.shape[2] > self._window_capacity
        for name in ("recent_keys", "recent_values", "recent_valid"):
            tensor = getattr(self, name)
            axis = 2 if tensor.ndim == 4 else 1  # tokens: [B, H, W, D] keys/values, [B, W] flags
            kept = tensor.narrow(axis, leaving, self.recent).clone()
            if shrinks:
                shape = list(tensor.shape)
                shape[axis] = self._window_capacity
                tensor = tensor.new_empty(shape)
            tensor.narrow(axis, 0, self.recent).copy_(kept)
            setattr(self, name, tensor)
        if shrinks:
            self._stores_changed(window=True)
        self._window = self.recent

    def commit(self, step: PendingStep, valid: torch.Tensor | None) -> None:
        """Store a step whose attention ran elsewhere (the exact prefill); same stores as `attend` leaves.

        Into an empty window, the tokens that would leave it at once go straight to the sink and middle stores, so a
        long prompt is never copied into the window first (less time, and less memory at the prefill's peak). The
        window is stored without the room decoding needs: the prefill is a generate call's memory peak (the model's
        activations for every prompt token), and the first decode step adds that room (one small copy per layer).
        """
        self._take(step)
        keys, values = step.keys, step.values
        if self._window == 0 and keys.shape[2] >= self.recent + self.block_size:
            leaving = keys.shape[2] - self.recent
            self._flush(keys[:, :, :leaving], values[:, :, :leaving], None if valid is None else valid[:, :leaving])
            keys, values = keys[:, :, leaving:], values[:, :, leaving:]
            valid = None if valid is None else valid[:, leaving:]
        self._append_to_window(keys, values, valid)
        self.settle()

    def _take(self, step: PendingStep) -> None:
        if step is not self._pending:
            raise RuntimeError("LeanKLayer got a step this layer did not hand out")
        self._pending = None

    def _append_to_window(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        self._open_window_slots(keys.shape[2], valid, decode_room=False)
        NewTokens(keys, values, valid).write(self.view())

    def _open_window_slots(self, count: int, valid: torch.Tensor | None, decode_room: bool = True) -> None:
        """Count `count` more tokens into the window, at its end (the caller writes them); `valid` their flags.

        With `decode_room` (a step that attends) the window stores grow past what these tokens need: once tokens
        have left the window, to what it holds while decoding (the steps after need no new store); before that (a
        short row, whose every token is in the window) by 1/16, as a `DynamicLayer` would hold about as much.
        Without it (the prefill, a generate call's memory peak) they grow only as far as these tokens need."""
        self._real_run = self._real_run + count if valid is None else 0
        needed = self._window + count
        if needed > self.recent_keys.shape[2]:
            capacity = needed
            if decode_room and self._has_flushed:
                capacity = max(needed, self._window_capacity)
            elif decode_room:
                capacity = max(needed, min(needed + max(1, int(needed * _GROWTH_FRACTION)), self._window_capacity))
            self.recent_keys = _grown(self.recent_keys, 2, self._window, capacity)
            self.recent_values = _grown(self.recent_values, 2, self._window, capacity)
            self.recent_valid = _grown(self.recent_valid, 1, self._window, capacity)
            self._stores_changed(window=True)
        self._window += count

    def _stores_changed(self, window: bool = False) -> None:
        """Forget the cached views once the sink or middle changed, or a store was replaced (`window`: a window store
        too), and take a new version, which tells the decode kernel to read the stores' strides again."""
        self._stored_view = None
        if window:
            self._window_views: dict[int, tuple[torch.Tensor, ...]] = {}
        self._stores_version = next(_STORE_VERSIONS)

    def _flush(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Move tokens `[B, H, n, D]` out of the window: a row's first `sink` real tokens to its sink, others to the
        middle store. `valid` `[B, n]`; None when every token is real."""
        self._stores_changed()
        self._has_flushed = True
        if valid is None and self._sinks_full:
            # What decoding does every `block_size` steps: every token goes to the middle, known on the host. (The
            # general path below reads its decisions back from the GPU, which stalls the host once per layer.)
            self._append_middle(keys, values, None)
            return
        valid = _validity(valid, keys)
        rank = self.sink_lengths.unsqueeze(1) + valid.long().cumsum(1) - 1  # real-token rank within the row
        to_sink = valid & (rank < self.sink)
        to_middle = valid & ~to_sink
        has_middle = to_middle.any(0)
        sink_lengths = self.sink_lengths + to_sink.sum(1)
        # One device-to-host read for the decisions below.
        decisions = (
            to_sink.any(), has_middle.any(), has_middle.long().argmax(), self._makes_hole(to_middle),
            sink_lengths.max(), sink_lengths.min() >= self.sink,
        )  # fmt: skip
        any_sink, any_middle, first, hole, sink_slots, sinks_full = torch.stack([d.long() for d in decisions]).tolist()
        self._sinks_full = bool(sinks_full)
        if self.sink and any_sink:
            self._grow_sink(sink_slots)
            rows, cols = to_sink.nonzero(as_tuple=True)
            slots = rank[rows, cols]
            self.sink_keys[rows, :, slots] = keys[rows, :, cols]
            self.sink_values[rows, :, slots] = values[rows, :, cols]
            self.sink_lengths = sink_lengths
            self._sink_slots = sink_slots
        if not any_middle:
            return
        # Leading columns that are sink or padding in every row are not stored.
        start = self._middle
        self._append_middle(keys[:, :, first:], values[:, :, first:], to_middle[:, first:])
        leading_invalid = (~to_middle[:, first:]).long().cumprod(1).sum(1)
        self.middle_start = torch.where(self.middle_start == start, start + leading_invalid, self.middle_start)
        self._middle_has_holes = self._middle_has_holes or bool(hole)

    def _grow_sink(self, slots: int) -> None:
        """Room for `slots` sink tokens per row (as many as the fullest row holds, never more than `sink`)."""
        held = self.sink_keys.shape[2]
        if slots <= held:
            return
        # Zeros, not empty: rows with fewer sink tokens than others read unfilled slots (with zero weight).
        self.sink_keys = _grown(self.sink_keys, 2, held, slots).index_fill_(2, self._range(held, slots), 0)
        self.sink_values = _grown(self.sink_values, 2, held, slots).index_fill_(2, self._range(held, slots), 0)

    def _range(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device)

    def _append_middle(self, keys: torch.Tensor, values: torch.Tensor, to_middle: torch.Tensor | None) -> None:
        """Store tokens `[B, H, n, D]` at the end of the middle stores; `to_middle` `[B, n]` flags the real ones (None:
        all). Nothing is stored when every head prunes every channel: nothing would ever read these tokens."""
        if self.layout.packed_channels == 0:
            return
        start, end = self._middle, self._middle + keys.shape[2]
        held = self.middle_keys.shape[2]
        capacity = end if end <= held else max(end, held + int(held * self._middle_growth))
        self.middle_keys = _grown(self.middle_keys, 2, start, capacity)
        self.middle_values = _grown(self.middle_values, 2, start, capacity)
        self.middle_valid = _grown(self.middle_valid, 1, start, capacity)
        self.layout.write_middle(keys, values, self.middle_keys[:, :, start:end], self.middle_values[:, :, start:end])
        flags = self.middle_valid.narrow(1, start, end - start)
        if to_middle is None:
            flags.fill_(True)
        else:
            flags.copy_(to_middle)
        self._middle = end

    def _makes_hole(self, to_middle: torch.Tensor) -> torch.Tensor:
        """Whether appending `to_middle` `[B, n]` would leave some row's real middle tokens non-contiguous (a
        non-real slot after a real one). Left padding never does; then each row's real middle tokens are exactly
        the slots from `middle_start` on, which is all the decode kernel reads (conservative: may say True when
        the slots in question are not stored)."""
        real_before = (self.middle_start < self._middle)[:, None]
        after_real = real_before | to_middle.long().cummax(1).values.bool()
        return (after_real & ~to_middle).any()

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-axis transform (beam reorder, repeat, select) to every stored tensor."""
        if not self.is_initialized:
            return
        if self._pending is not None:
            raise RuntimeError("cannot reorder a LeanKCache in the middle of a forward pass")
        for name in _STORE_NAMES:
            setattr(self, name, fn(getattr(self, name)))
        self.batch_size = self.sink_lengths.shape[0]
        self._sink_slots = int(self.sink_lengths.max()) if self.batch_size else 0
        self._stores_changed(window=True)

    # --------------------------------------------------------------------------------------------- memory
    def memory(self, layer_idx: int) -> LayerMemory:
        """Bytes this layer holds, and what a `DynamicLayer` would hold for the same tokens."""
        if not self.is_initialized:
            return LayerMemory(layer_idx, "leank", 0, 0, 0, 0, 0)
        key_bytes = held_bytes(self.sink_keys, self.middle_keys, self.recent_keys)
        value_bytes = held_bytes(self.sink_values, self.middle_values, self.recent_values)
        other_bytes = held_bytes(*self._bookkeeping())
        batch, heads, _, head_dim = self.recent_keys.shape
        dense = 2 * batch * heads * self._stored_count() * head_dim * self.recent_keys.element_size()
        reserved = key_bytes + value_bytes + other_bytes - self._bytes_in_use()
        return LayerMemory(layer_idx, "leank", key_bytes, value_bytes, other_bytes, reserved, dense)

    def _bookkeeping(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors besides keys and values that this layer holds: validity flags, sink lengths, middle starts."""
        return self.sink_lengths, self.middle_valid, self.middle_start, self.recent_valid

    def _stored_count(self) -> int:
        """Tokens stored per row, padding included (what a `DynamicLayer` would hold)."""
        return self.seq_len

    def _bytes_in_use(self) -> int:
        """Bytes of the stores that hold tokens (the rest is capacity reserved for later ones)."""
        return (
            _live_bytes(self.sink_keys, 2, self._sink_slots) * 2
            + _live_bytes(self.middle_keys, 2, self._middle)
            + _live_bytes(self.middle_values, 2, self._middle)
            + _live_bytes(self.middle_valid, 1, self._middle)
            + _live_bytes(self.recent_keys, 2, self._window) * 2
            + _live_bytes(self.recent_valid, 1, self._window)
            + held_bytes(self.sink_lengths, self.middle_start)
        )


def _middle_growth(layout: ChannelLayout, heads: int, head_dim: int) -> float:
    """Share of its size by which a middle store grows: `_GROWTH_FRACTION`, or less when a token's pruned keys and
    values save less than that against its full ones, so that the reserve never costs more than the pruning saved."""
    middle = layout.packed_channels + layout.value_rows * head_dim  # per token, in elements
    full = 2 * heads * head_dim
    return min(_GROWTH_FRACTION, (full - middle) / middle) if middle else 0.0


def _validity(valid: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """`[B, Q]` real-token flags of `keys` `[B, H, Q, D]`; None means every token is real."""
    if valid is None:
        return torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)
    return valid


def _live_bytes(tensor: torch.Tensor, dim: int, used: int) -> int:
    return tensor.numel() // max(tensor.shape[dim], 1) * used * tensor.element_size()


def _grown(tensor: torch.Tensor, dim: int, used: int, capacity: int) -> torch.Tensor:
    """`tensor` with room for at least `capacity` entries along `dim`, keeping the first `used` (itself if it has)."""
    if capacity <= tensor.shape[dim]:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = capacity
    grown = tensor.new_empty(shape)
    grown.narrow(dim, 0, used).copy_(tensor.narrow(dim, 0, used))
    return grown
