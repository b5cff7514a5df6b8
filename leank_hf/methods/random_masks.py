"""Random masks: channels kept at random, with counts aligned like learned masks; the floor any method must beat."""

from __future__ import annotations

import torch

from ..architectures import ModelSpec
from ..masks import DEFAULT_ALIGN, LeanKMasks, select_channels


def random_masks(spec: ModelSpec, keep_ratio: float, align: int = DEFAULT_ALIGN, seed: int = 0, **config) -> LeanKMasks:
    """Channels kept at random (global selection on random scores, counts aligned like learned masks)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(spec.num_layers, spec.num_kv_heads, spec.head_dim, generator=generator)
    mask = select_channels(scores, keep_ratio, align, layers=spec.leank_layers)
    method = {"name": "random", "keep_ratio": keep_ratio, "seed": seed}
    return LeanKMasks(
        mask, align=align, layer_types=spec.layer_types, model_type=spec.model_type, method=method, **config
    )
