"""ThinK-style masks (arXiv 2407.21018): channels chosen per prompt from its own queries, a baseline for learned
masks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..architectures import ModelSpec
from ..cache.attention import observing
from ..masks import LeanKMasks

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class QueryWindowStats:
    """ThinK's channel scores for one prompt: ‖q_c‖ over the last `window` queries (and the KV group's query heads)
    times ‖k_c‖ over all keys, per layer and KV head. Accepts a batch of one prompt."""

    def __init__(self, spec: ModelSpec, window: int) -> None:
        self.scores = torch.zeros(spec.num_layers, spec.num_kv_heads, spec.head_dim)
        self.window = window

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None) -> None:
        if key.shape[0] != 1:
            raise ValueError(f"ThinK masks are per prompt: pass one prompt, not a batch of {key.shape[0]}")
        heads, head_dim = key.shape[1], key.shape[3]
        recent_queries = query[0, :, -self.window :].float().reshape(heads, -1, head_dim)  # [H, G*w, D]
        self.scores[layer] = (recent_queries.norm(dim=1) * key[0].float().norm(dim=1)).cpu()


def think_masks(
    model: PreTrainedModel, input_ids: torch.Tensor, keep_ratio: float, window: int = 32, **config
) -> LeanKMasks:
    """ThinK-style (arXiv 2407.21018) query-driven masks for one prompt `[1, T]`: every KV head keeps its
    `round(keep_ratio · head_dim)` channels with the largest ‖q_c‖·‖k_c‖, queries from the prompt's last `window`
    tokens. Counts are not aligned (align 1) and the same for every head, as in ThinK, so the kept share is
    `round(keep_ratio · head_dim) / head_dim`, within half a channel per head of `keep_ratio`."""
    spec = ModelSpec.from_model(model)
    with torch.no_grad(), observing(model, QueryWindowStats(spec, window)) as stats:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    kept = round(keep_ratio * spec.head_dim)
    mask = torch.ones(stats.scores.shape, dtype=torch.bool)
    top = stats.scores[spec.leank_layers].topk(kept, dim=-1).indices
    mask[spec.leank_layers] = torch.zeros_like(mask[spec.leank_layers]).scatter_(-1, top, True)
    method = {"name": "think", "keep_ratio": keep_ratio, "query_window": window}
    return LeanKMasks(mask, align=1, layer_types=spec.layer_types, model_type=spec.model_type, method=method, **config)
