"""Turn per-channel importance scores into a binary keep-mask with aligned per-head counts.

Used by the calibration heuristic and, in training, by stage 2's binarisation: both keep the globally
best channels, then round every head's count to the kernel alignment while holding the global total.
"""

from __future__ import annotations

import warnings

import torch

# The paper's share of key channels kept: 30 % (the shipped SmolLM2 masks keep 29 of 29 retrieval tasks at it).
DEFAULT_KEEP_RATIO = 0.3
# Per-head kept counts are multiples of this: the decode kernel reads channel tiles of it, and 16 leaves the selection
# more freedom than the paper's 32 while keeping every tile full.
DEFAULT_ALIGN = 16


def select_channels(
    scores: torch.Tensor,
    keep_ratio: float,
    align: int,
    layers: list[int] | None = None,
) -> torch.BoolTensor:
    """Keep the globally highest-scoring channels, with per-head counts that are multiples of `align`.

    The global top ``keep_ratio`` share of channels decides how many channels each head gets; the counts are
    then rounded to multiples of `align` by the largest-remainder method, so the total stays the aligned
    target. Inside each head the highest-scoring channels are kept.

    Args:
        scores: `[layers, kv_heads, head_dim]` importance of each post-RoPE key channel (higher = keep).
        keep_ratio: share of channels to keep, in `[0, 1]`; a positive ratio that rounds to no group of `align`
            channels warns (everything is pruned).
        align: per-head counts are multiples of this (`head_dim` must be divisible by it).
        layers: layers to select in (the others keep every channel and do not count towards the ratio);
            `None` means all layers.

    Returns:
        `[layers, kv_heads, head_dim]` bool mask, True = keep.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be [layers, kv_heads, head_dim], got shape {tuple(scores.shape)}")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    num_layers, _, head_dim = scores.shape
    if align <= 0 or head_dim % align:
        raise ValueError(
            f"head_dim {head_dim} is not divisible by the alignment {align}; pick an align that divides it"
        )
    layers = list(range(num_layers)) if layers is None else list(layers)

    mask = torch.ones(scores.shape, dtype=torch.bool)
    if not layers:
        return mask
    selected = scores[layers].detach().float().cpu()  # [L', H, D]
    units_per_head = head_dim // align
    total_units = kept_groups(keep_ratio, selected.numel(), align)
    if keep_ratio > 0 and total_units == 0:
        warnings.warn(
            f"keep_ratio {keep_ratio} of {selected.numel()} channels rounds to no group of {align}, so every channel "
            f"is pruned; keep_ratio {align / selected.numel():.4g} keeps one group",
            stacklevel=2,
        )

    # How many channels each head would get from a global top-k, in units of `align`.
    k = min(total_units * align, selected.numel())
    counts = torch.zeros(selected.shape[:2])
    if k > 0:
        top = selected.flatten().topk(k).indices // head_dim
        counts = torch.bincount(top, minlength=counts.numel()).reshape(counts.shape).float()
    units = _round_preserving_total(counts / align, total_units, units_per_head)

    # Inside each head, keep its `units * align` best channels.
    order = selected.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(head_dim).expand_as(order).contiguous())
    mask[layers] = rank < (units * align).unsqueeze(-1)
    return mask


def kept_groups(keep_ratio: float, channels: int, align: int) -> int:
    """How many groups of `align` channels `select_channels` keeps of `channels` at `keep_ratio` (rounded)."""
    return round(keep_ratio * channels / align)


def _round_preserving_total(values: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Round non-negative `values` to integers in `[0, cap]` that sum to `total` (largest remainder first)."""
    floor = values.floor().clamp(max=cap).long()
    missing = total - int(floor.sum())
    if missing > 0:
        # Heads with the largest fractional part get a unit first; full heads can't take one.
        remainder = (values - floor).masked_fill(floor >= cap, -1.0).flatten()
        order = remainder.argsort(descending=True, stable=True)
        room = (cap - floor).flatten()
        flat = floor.flatten()
        for idx in order.tolist():
            if missing == 0:
                break
            give = min(int(room[idx]), missing, 1)
            flat[idx] += give
            missing -= give
        floor = flat.reshape(floor.shape)
    return floor
