"""LeanK attention written straight from its definition, on dense full keys, independently of the library's stores.

For a step that adds tokens `[P, P + n)` to a sequence, query `P + i` sees keys `j <= P + i` that are real tokens:
- at full width if `j` is new in this step, in the recent window (`j >= P - W`, W the window size before the step),
  or among the first `sink` real tokens of its row;
- otherwise ("middle") on the head's kept channels only, and not at all if the head keeps no channel.
The first step (P == 0) is plain causal attention. The window grows by each step's tokens and, when it reaches
`recent + block`, shrinks to `recent`.
"""

from __future__ import annotations

import torch


def window_sizes(step_lengths: list[int], recent: int, block: int) -> list[int]:
    """Window size before each step: once a step leaves `recent + block` tokens or more in the window, its oldest
    tokens leave it in whole blocks, as many as leave at least `recent` (the window starts on a block boundary)."""
    sizes, window = [], 0
    for n in step_lengths:
        sizes.append(window)
        window += n
        if window >= recent + block:
            window -= (window - recent) // block * block
    return sizes


def dense_leank_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    start: int,
    window: int,
    channel_mask: torch.Tensor,
    sink: int,
    scaling: float,
) -> torch.Tensor:
    """Output `[B, Hq, n, D]` (fp64) for queries of tokens `[start, start + n)`.

    Args:
        queries: `[B, Hq, n, D]`.
        keys, values: `[B, H, start + n, D]` every token so far, full width.
        valid: `[B, start + n]` bool, False for padding.
        window: recent-window size before this step.
        channel_mask: `[H, D]` bool keep-mask.
    """
    batch, num_q_heads, n, head_dim = queries.shape
    num_heads, total = keys.shape[1], keys.shape[2]
    group = num_q_heads // num_heads
    q = queries.double().reshape(batch, num_heads, group, n, head_dim)
    k, v = keys.double(), values.double()
    keep = channel_mask.double()[None, :, None, :]  # [1, H, 1, D]
    device = queries.device
    positions = torch.arange(total, device=device)
    real_rank = valid.long().cumsum(1) - 1  # rank of each real token within its row
    full = (positions >= start - window) | (real_rank < sink)  # [B, T]; new tokens are >= start - window
    if start == 0:
        full = torch.ones_like(full)
    has_middle = channel_mask.any(-1)  # [H]
    visible = valid[:, None, :] & (
        positions[None, None, :] <= start + torch.arange(n, device=device)[None, :, None]
    )  # [B, n, T]

    full_scores = torch.einsum("bhgid,bhjd->bhgij", q, k)
    middle_scores = torch.einsum("bhgid,bhjd->bhgij", q * keep[:, :, None], k * keep)
    scores = torch.where(full[:, None, None, None, :], full_scores, middle_scores)
    allowed = visible[:, None, None] & (full[:, None, None, None, :] | has_middle[None, :, None, None, None])
    scores = scores.masked_fill(~allowed, -torch.inf) * scaling
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key (padding) outputs zeros
    out = torch.einsum("bhgij,bhjd->bhgid", probs, v)
    return out.reshape(batch, num_q_heads, n, head_dim)
