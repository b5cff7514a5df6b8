"""`LeanKCache`: a drop-in `transformers.Cache` whose full-attention layers store pruned keys."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

from ..architectures import LEANK_LAYER_TYPE, ModelSpec, warn_if_nothing_is_pruned
from ..kv_quantization import KVQuantization
from ..masks import LeanKMasks
from ..memory import LayerMemory, MemoryReport, held_bytes
from ..windows import WindowConfig
from . import attention
from .layer import LeanKLayer
from .static_layer import StaticLeanKLayer


class LeanKCache(Cache):
    """KV cache that keeps only the masked-in key channels of tokens between the sink and the recent window.

    Pass it to `generate` (or a forward) as `cache` from transformers 5.24 on (`past_key_values` still works there,
    with a deprecation warning), as `past_key_values` before. Constructing it switches `model` to the ``"leank"``
    attention implementation, which runs the model's own attention (eager or SDPA) for the prefill and pruned
    attention afterwards; with any other cache the model keeps behaving exactly as before. Sliding-window layers
    (Gemma3) keep transformers' own layers (the static ones with `max_cache_len`).

    Args:
        masks: the channel masks, made for this model.
        model: the model the cache is for; checked against the masks.
        sink: override `masks.sink` for this cache.
        recent: override `masks.recent` for this cache.
        block_size: override `masks.block_size` for this cache.
        max_cache_len: the most tokens a row will hold (prompt and new tokens). Given, the LeanK layers keep fixed-size
            stores after the prefill (`StaticLeanKLayer`) and `generate` compiles its decode steps (`torch.compile`,
            CUDA graphs) as it does for a `StaticCache`; the prefill stays eager. None: stores grow as tokens come,
            decoding stays eager, and every `generate` feature works (chunked prefill, assisted decoding).
        kv_bits: 8 or 4 to store the middle tokens as low-bit codes that the decode kernel reads as they are (keys per
            channel per block of `block_size` tokens, values per token in groups of `q_group_size` channels; see
            `KVQuantization`, which also maps these names to transformers' `QuantizedCache`'s). None: the model's
            dtype. The sink and the recent window always stay in the model's dtype.
        q_group_size: value channels per scale and zero with `kv_bits`; must divide the model's head_dim. None: 64,
            or the largest power of two dividing head_dim where that is less.

    Example:
        ```python
        cache = LeanKCache.from_pretrained("path/to/masks", model)
        out = model.generate(**inputs, cache=cache, max_new_tokens=256)  # past_key_values=cache before 5.24
        print(cache.memory_report())
        ```
    """

    def __init__(
        self,
        masks: LeanKMasks,
        model: PreTrainedModel,
        *,
        sink: int | None = None,
        recent: int | None = None,
        block_size: int | None = None,
        max_cache_len: int | None = None,
        kv_bits: int | None = None,
        q_group_size: int | None = None,
    ) -> None:
        quantization = KVQuantization(kv_bits, q_group_size)
        spec = ModelSpec.from_model(model)
        if kv_bits is not None:
            quantization.group_size(spec.head_dim)  # refuses a group that does not divide head_dim
        warn_if_nothing_is_pruned(spec, "a LeanKCache would")
        masks.check_compatible(spec, getattr(model.config, "_name_or_path", None))
        sink = masks.sink if sink is None else sink
        recent = masks.recent if recent is None else recent
        block_size = masks.block_size if block_size is None else block_size
        windows = WindowConfig(sink, recent, block_size)  # refuses windows out of range
        _check_windows_fit(model, sink, recent, block_size)
        if max_cache_len is not None and (
            isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1
        ):
            raise ValueError(
                f"max_cache_len must be a positive int (the most tokens a row holds: prompt plus new tokens), got "
                f"{max_cache_len!r}"
            )
        self._max_cache_len = max_cache_len
        self._prompt_tokens = 0  # per row, padding included, for `_check_room`'s message
        self.masks = masks
        self.sink, self.recent, self.block_size = sink, recent, block_size
        self.quantization = quantization

        prunes = max_cache_len is None or _fixed_stores_save_memory(masks, spec, windows, quantization, max_cache_len)

        def leank_layer(index: int) -> LeanKLayer | StaticLayer:
            mask = masks.channel_mask[index]
            if max_cache_len is None:
                return LeanKLayer(mask, sink, recent, block_size, quantization)
            if not prunes:
                return StaticLayer(max_cache_len=max_cache_len)
            return StaticLeanKLayer(mask, sink, recent, block_size, max_cache_len, quantization)

        layers = [
            leank_layer(i) if layer_type == LEANK_LAYER_TYPE else _stock_layer(layer_type, spec, max_cache_len)
            for i, layer_type in enumerate(spec.layer_types)
        ]
        super().__init__(layers=layers)
        self._full_layer = next((i for i, kind in enumerate(spec.layer_types) if kind == LEANK_LAYER_TYPE), 0)
        attention.enable(model)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        if self._max_cache_len is not None and layer_idx == 0 and not torch.compiler.is_compiling():
            self._check_room(key_states.shape[2])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """As transformers' `Cache.get_mask_sizes`; with `max_cache_len`, also where a step that would not fit is
        refused: `generate` asks this on the host before every step, also before a step compiled into a CUDA graph,
        which runs no Python in `update`."""
        if self._max_cache_len is not None and not torch.compiler.is_compiling():
            self._check_room(query_length)
        return super().get_mask_sizes(query_length, layer_idx)

    def _check_room(self, count: int) -> None:
        """Refuse a step of `count` tokens per row that would not fit `max_cache_len`, before anything is written.

        The tokens held are read from the first full-attention layer, where compiled steps count them on the device
        (reading them waits for the GPU, which `generate` has done already by then: it reads each step's stopping
        criteria). A forward you compile whole yourself is not checked, as with a `StaticCache`."""
        held = int(self.get_seq_length(self._full_layer))
        if held + count <= self._max_cache_len:
            if held == 0:
                self._prompt_tokens = count
            return
        if held == 0:
            raise ValueError(
                f"the prompt ({count} tokens per row, padding included) does not fit max_cache_len="
                f"{self._max_cache_len}: give max_cache_len at least the prompt length plus max_new_tokens"
            )
        raise ValueError(
            f"max_cache_len={self._max_cache_len} is full: the rows hold {held} tokens (a prompt of "
            f"{self._prompt_tokens} and {held - self._prompt_tokens} new ones) and this step adds {count}. Give "
            "max_cache_len at least the prompt length plus max_new_tokens"
        )

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, model: PreTrainedModel, **kwargs: Any) -> LeanKCache:
        """A fresh, empty cache for `model` with masks from a mask repo (loaded once, then memoised).

        Args:
            pretrained: a local mask directory, a shipped mask's short name, or a Hub repo id.
            model: the model the cache is for; the masks are checked against it.
            **kwargs: `sink`, `recent`, `block_size` overrides, `max_cache_len`, `kv_bits` and `q_group_size` for this
                cache, and the Hub
                arguments of `LeanKMasks.from_pretrained` (`revision`, `token`, `cache_dir`, `local_files_only`,
                `force_download`).
        """
        names = ("sink", "recent", "block_size", "max_cache_len", "kv_bits", "q_group_size")
        cache_kwargs = {k: kwargs.pop(k) for k in names if k in kwargs}
        return cls(LeanKMasks.from_pretrained(pretrained, **kwargs), model, **cache_kwargs)

    def memory_report(self) -> MemoryReport:
        """Bytes held per layer and in total, against what the stock cache would hold: a `DynamicCache` for the same
        tokens, or with `max_cache_len` a `StaticCache` of that length."""
        layers = tuple(_layer_memory(i, layer) for i, layer in enumerate(self.layers))
        return MemoryReport(layers, baseline="DynamicCache" if self._max_cache_len is None else "StaticCache")

    def __repr__(self) -> str:
        bits = "" if self.quantization.kv_bits is None else f"kv_bits={self.quantization.kv_bits}, "
        return (
            f"LeanKCache(layers={len(self.layers)}, keep_ratio={self.masks.keep_ratio:.3f}, sink={self.sink}, "
            f"recent={self.recent}, block_size={self.block_size}, {bits}seq_length={self.get_seq_length()})"
        )


def _check_windows_fit(model: PreTrainedModel, sink: int, recent: int, block_size: int) -> None:
    """Refuse windows longer than any sequence the model can read: they would prune nothing, and a mask repo that
    sets them (say `sink: 1000000`) must not size anything by them."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if isinstance(limit, int) and sink + recent + block_size > limit:
        raise ValueError(
            f"sink + recent + block_size = {sink} + {recent} + {block_size} exceeds the {limit} positions "
            f"{type(model).__name__} reads (max_position_embeddings): no token would ever be pruned. Pass smaller "
            "sink=, recent= or block_size= to the cache, or fix them in the mask repo's leank_config.json"
        )


def _fixed_stores_save_memory(
    masks: LeanKMasks, spec: ModelSpec, windows: WindowConfig, quantization: KVQuantization, max_cache_len: int
) -> bool:
    """Whether `StaticLeanKLayer`s hold fewer bytes than a `StaticCache` of `max_cache_len` would, summed over the
    layers LeanK prunes; warns when they do not, and the cache then keeps full keys as a `StaticCache` does.

    A fixed-size LeanK layer holds its sink and its window ring (`recent + block_size` tokens) at full width, and a
    pruned middle slot for every other position up to `max_cache_len`: short lengths cannot pay for the window. (In
    bf16 bytes per element; fp16 scales when quantized.)"""
    full = 2 * spec.num_kv_heads * spec.head_dim * 2  # bytes per token, keys and values
    window = windows.sink + windows.recent + windows.block_size
    leank = static = 0.0
    for layer in spec.leank_layers:
        mask = masks.channel_mask[layer]
        middle = quantization.middle_bytes(int(mask.sum()), int(mask.any(-1).sum()) * spec.head_dim, spec.head_dim,
                                           windows.block_size, 2)  # fmt: skip
        leank += window * full + max(max_cache_len - windows.sink, 0) * middle
        static += max_cache_len * full
    if leank <= static:
        return True
    warnings.warn(
        f"max_cache_len={max_cache_len} is too short for these LeanK masks to save memory: their fixed-size stores "
        f"would hold {leank / static:.2f}x a StaticCache's bytes (sink + recent + block_size = {window} tokens stay "
        "at full width), so this cache keeps full keys like a StaticCache. Give a larger max_cache_len, or smaller "
        "windows, for LeanK to prune.",
        stacklevel=3,
    )
    return False


def _stock_layer(
    layer_type: str, spec: ModelSpec, max_cache_len: int | None
) -> DynamicSlidingWindowLayer | StaticSlidingWindowLayer:
    """transformers' own layer for a layer LeanK leaves alone: a sliding window, fixed-size when the cache is."""
    if layer_type == "sliding_attention" and spec.sliding_window:
        if max_cache_len is None:
            return DynamicSlidingWindowLayer(sliding_window=spec.sliding_window)
        return StaticSlidingWindowLayer(max_cache_len=max_cache_len, sliding_window=spec.sliding_window)
    raise ValueError(f"LeanK does not support {spec.architecture} layers of type {layer_type!r}")


def _layer_memory(index: int, layer: Any) -> LayerMemory:
    if isinstance(layer, LeanKLayer):
        return layer.memory(index)
    # A stock layer holds the same as the DynamicCache would: its keys and values.
    keys, values = (layer.keys, layer.values) if layer.is_initialized else (None, None)
    key_bytes, value_bytes = held_bytes(keys), held_bytes(values)
    return LayerMemory(index, type(layer).__name__, key_bytes, value_bytes, 0, 0, key_bytes + value_bytes)
