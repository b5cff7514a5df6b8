"""Training-free masks: score post-RoPE key channels by mean |q_c| · mean |k_c| over calibration text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..architectures import ModelSpec, warn_if_nothing_is_pruned
from ..cache.attention import observing
from ..masks import DEFAULT_ALIGN, DEFAULT_KEEP_RATIO, LeanKMasks, as_hub_id, select_channels

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ChannelStats:
    """Running sums of |q| and |k| per layer, KV head and channel over real (non-padding) tokens."""

    def __init__(self, spec: ModelSpec) -> None:
        shape = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
        self.abs_query = torch.zeros(shape, dtype=torch.float64)
        self.abs_key = torch.zeros(shape, dtype=torch.float64)
        self.tokens = torch.zeros(spec.num_layers, dtype=torch.float64)
        self.layers = set(spec.leank_layers)

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Accumulate `query` `[B, Hq, T, D]` and `key` `[B, H, T, D]`; `valid` `[B, T]` (None = all real)."""
        if layer not in self.layers:
            return
        batch, heads, tokens, head_dim = key.shape
        # |q| averaged over the query heads that share a KV head.
        abs_q = query.detach().abs().float().reshape(batch, heads, -1, tokens, head_dim).mean(2)
        abs_k = key.detach().abs().float()
        weight = torch.ones(batch, tokens, device=key.device) if valid is None else valid.float()
        weight = weight[:, None, :, None]
        self.abs_query[layer] += (abs_q * weight).sum((0, 2)).double().cpu()
        self.abs_key[layer] += (abs_k * weight).sum((0, 2)).double().cpu()
        self.tokens[layer] += float(weight.sum())

    def scores(self) -> torch.Tensor:
        """`[layers, kv_heads, head_dim]` mean |q_c| · mean |k_c|."""
        count = self.tokens.clamp(min=1)[:, None, None]
        return (self.abs_query / count) * (self.abs_key / count)


def calibrated_masks(
    model: PreTrainedModel,
    input_ids: torch.Tensor | list[str],
    keep_ratio: float = DEFAULT_KEEP_RATIO,
    align: int = DEFAULT_ALIGN,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 1,
    **config: Any,
) -> LeanKMasks:
    """Training-free masks: keep the channels with the largest mean |q_c| · mean |k_c| on calibration text.

    Each post-RoPE key channel `c` of a KV head is scored by the mean absolute key value times the mean absolute
    query value (averaged over the query heads that share the KV head) over all non-padding tokens; the top channels
    are kept globally with per-head counts rounded to `align` (see `select_channels`).

    Args:
        model: a supported causal LM; it attends as before afterwards (see `leank_hf.attention.observing`).
        input_ids: `[batch, tokens]` LongTensor of calibration text, or a list of strings with `tokenizer`.
        keep_ratio: share of key channels to keep; 1.0 keeps every channel.
        align: per-head kept counts are multiples of this.
        tokenizer: needed when `input_ids` is a list of strings.
        attention_mask: `[batch, tokens]` padding mask for `input_ids`, 1 = real token.
        batch_size: sequences per forward pass.
        **config: other `LeanKMasks` fields (`sink`, `recent`, `block_size`, `base_model`, ...); they win over what
            calibration records (the model's type, layer types and Hub id, and the method).
    """
    spec = ModelSpec.from_model(model)
    warn_if_nothing_is_pruned(spec, "calibrated masks")
    input_ids, attention_mask = _as_token_batch(input_ids, attention_mask, tokenizer)
    device = model.device
    with torch.no_grad(), observing(model, ChannelStats(spec)) as stats:
        for start in tqdm(range(0, len(input_ids), batch_size), desc="LeanK calibration", unit="batch"):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device) if attention_mask is not None else None
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    mask = select_channels(stats.scores(), keep_ratio, align, layers=spec.leank_layers)
    method = {
        "name": "calibration",
        "score": "mean|q_c| * mean|k_c| over real tokens, q averaged over the KV group",
        "keep_ratio": keep_ratio,
        "tokens": int(stats.tokens.max()),
    }
    recorded = {
        "align": align,
        "layer_types": spec.layer_types,
        "model_type": spec.model_type,
        # A model loaded from a local folder knows only that folder: a path is never recorded as the Hub id.
        "base_model": as_hub_id(getattr(model.config, "_name_or_path", None) or None),
        "base_model_revision": getattr(model.config, "_commit_hash", None),
        "method": method,
    }
    return LeanKMasks(mask, **{**recorded, **config})


def _as_token_batch(
    input_ids: torch.Tensor | list[str],
    attention_mask: torch.Tensor | None,
    tokenizer: PreTrainedTokenizerBase | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(input_ids, (list, tuple)):
        if tokenizer is None:
            raise ValueError("calibrated_masks got text; pass tokenizer= to tokenize it (or pass token ids)")
        encoded = tokenizer(list(input_ids), return_tensors="pt", padding=True)
        return encoded["input_ids"], encoded["attention_mask"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be a [batch, tokens] LongTensor of calibration text (or a list of strings)")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    return input_ids, attention_mask
