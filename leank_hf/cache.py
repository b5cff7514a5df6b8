"""`LeanKCache`: a drop-in `transformers.Cache` whose full-attention layers store pruned keys."""

from __future__ import annotations

import os
from typing import Any

from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, StaticSlidingWindowLayer

from . import attention
from .architectures import LEANK_LAYER_TYPE, ModelSpec
from .cache_layer import LeanKLayer
from .masks import LeanKMasks, validate_windows
from .memory import LayerMemory, MemoryReport, held_bytes
from .static_layer import StaticLeanKLayer


class LeanKCache(Cache):
    """KV cache that keeps only the masked-in key channels of tokens between the sink and the recent window.

    Pass it to `generate` (or a forward) as `cache` from transformers 5.24 on (`past_key_values` still works there,
    with a deprecation warning), as `past_key_values` before. Constructing it switches `model` to the ``"leank"``
    attention implementation, which runs exact SDPA for the prefill and pruned attention afterwards; with any other
    cache the model keeps behaving exactly like SDPA. Sliding-window layers (Gemma3) keep transformers' own layers
    (the static ones with `max_cache_len`).

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
    ) -> None:
        spec = ModelSpec.from_model(model)
        masks.check_compatible(spec, getattr(model.config, "_name_or_path", None))
        sink = masks.sink if sink is None else sink
        recent = masks.recent if recent is None else recent
        block_size = masks.block_size if block_size is None else block_size
        validate_windows(sink, recent, block_size)
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len <= sink + recent):
            raise ValueError(
                f"max_cache_len must be an int above sink + recent = {sink + recent} (the prompt plus the new tokens), "
                f"got {max_cache_len!r}"
            )
        self.masks, self.spec = masks, spec
        self.sink, self.recent, self.block_size = sink, recent, block_size

        def leank_layer(index: int) -> LeanKLayer:
            if max_cache_len is None:
                return LeanKLayer(masks.channel_mask[index], sink, recent, block_size)
            return StaticLeanKLayer(masks.channel_mask[index], sink, recent, block_size, max_cache_len)

        layers = [
            leank_layer(i) if layer_type == LEANK_LAYER_TYPE else _stock_layer(layer_type, spec, max_cache_len)
            for i, layer_type in enumerate(spec.layer_types)
        ]
        super().__init__(layers=layers)
        attention.enable(model)

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, model: PreTrainedModel, **kwargs: Any) -> LeanKCache:
        """A fresh, empty cache for `model` with masks from a mask repo (loaded once, then memoised).

        Args:
            pretrained: a local mask directory, a shipped mask's short name, or a Hub repo id.
            model: the model the cache is for; the masks are checked against it.
            **kwargs: `sink`, `recent`, `block_size` overrides and `max_cache_len` for this cache, and the Hub
                arguments of `LeanKMasks.from_pretrained` (`revision`, `token`, `cache_dir`, `local_files_only`,
                `force_download`).
        """
        cache_kwargs = {k: kwargs.pop(k) for k in ("sink", "recent", "block_size", "max_cache_len") if k in kwargs}
        return cls(LeanKMasks.from_pretrained(pretrained, **kwargs), model, **cache_kwargs)

    def memory_report(self) -> MemoryReport:
        """Bytes held per layer and in total, against what a `DynamicCache` would hold for the same tokens."""
        return MemoryReport(tuple(_layer_memory(i, layer) for i, layer in enumerate(self.layers)))

    def __repr__(self) -> str:
        return (
            f"LeanKCache(layers={len(self.layers)}, keep_ratio={self.masks.keep_ratio:.3f}, sink={self.sink}, "
            f"recent={self.recent}, block_size={self.block_size}, seq_length={self.get_seq_length()})"
        )


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
