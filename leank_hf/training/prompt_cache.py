"""A cache that holds a prompt's keys and values and lets several forwards of the answer read it without growing."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _PromptLayer(DynamicLayer):
    """Stores what the prefill writes; once frozen, returns prompt + the new tokens and stores nothing."""

    frozen = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.frozen:
            return super().update(key_states, value_states, *args, **kwargs)
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PromptCache(Cache):
    """Prefill the prompt once, `freeze()`, then run the teacher's and the student's answer forwards on top of it.

    Every layer keeps the whole prompt (sliding-window layers too: their attention mask limits what they see), so
    answer forwards see exactly what a full-attention prefill would have left them.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[_PromptLayer() for _ in range(num_layers)])

    def freeze(self) -> None:
        for layer in self.layers:
            layer.frozen = True
