"""The ``"leank"`` attention implementation: exact SDPA for prefill, pruned attention once a LeanK layer holds tokens.

It is registered with transformers' `AttentionInterface`, and `sdpa_mask` is registered under the same name with
`AttentionMaskInterface` so that padding reaches it. Calls that do not come from a `LeanKLayer` (sliding layers,
other caches, no cache) go to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache_layer import PendingStep

ATTN_IMPLEMENTATION = "leank"


def register_implementation(name: str, attention_function) -> None:
    """Register `attention_function` under `name`, with `sdpa_mask` under the same name so that padding reaches it
    as the boolean mask SDPA takes (safe to call repeatedly)."""
    AttentionInterface.register(name, attention_function)
    AttentionMaskInterface.register(name, sdpa_mask)


def register() -> None:
    """Register the ``"leank"`` attention and mask functions with transformers (safe to call repeatedly)."""
    register_implementation(ATTN_IMPLEMENTATION, leank_attention_forward)


def enable(model: PreTrainedModel) -> None:
    """Make `model` attend through LeanK; with caches other than `LeanKCache` it behaves exactly like SDPA."""
    register()
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def leank_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | PendingStep,
    value: torch.Tensor | PendingStep,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function; returns `([B, Q, Hq, D], None)` like the SDPA integration."""
    if not isinstance(key, PendingStep):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions=True is not supported with LeanKCache: LeanK never materialises attention weights; "
            "drop output_attentions, or inspect weights with a DynamicCache and attn_implementation='eager'."
        )
    step, layer = key, key.layer
    valid = new_token_validity(attention_mask, step.keys.shape[2], step.keys.shape[0])
    if layer.stored_tokens == 0:
        # Prefill: the model's own exact attention, so the first generated token is unchanged.
        output, _ = sdpa_attention_forward(
            module, query, step.keys, step.values, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        layer.commit(step, valid)
        return output, None
    output = layer.attend(query, step, valid, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return output.transpose(1, 2).contiguous(), None


def new_token_validity(attention_mask: torch.Tensor | None, num_new: int, batch: int) -> torch.Tensor | None:
    """`[B, Q]` bool, False where this step's tokens are padding; None when nothing is padded.

    The mask's last query row sees every new key it may (causality allows all of them), so its last `Q` columns are
    exactly the padding flags of the new tokens. Boolean (SDPA) and additive float masks are both understood.
    """
    if attention_mask is None:
        return None
    last_row = attention_mask[:, 0, -1, -num_new:]
    if last_row.dtype != torch.bool:
        last_row = last_row > torch.finfo(last_row.dtype).min / 2
    return last_row.expand(batch, num_new)
