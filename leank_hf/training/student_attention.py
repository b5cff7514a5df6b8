"""The student's attention during mask learning: answer queries see `k ⊙ scale` for middle tokens.

Registered with transformers' `AttentionInterface` as ``"leank_student"``. While a `StudentStep` is active (the
student's answer forward), full-attention layers run `masked_answer_attention`; everything else (prefill, teacher,
sliding layers) is transformers' SDPA function unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..cache.attention import register_implementation

STUDENT_IMPLEMENTATION = "leank_student"
# Scores per chunk of answer queries (batch x q heads x queries x keys): 64 Mi elements, 256 MiB per fp32 tensor of
# that shape (a chunk holds a few: both score variants, the probabilities, and what autograd saves).
_MAX_SCORES = 1 << 26


@dataclass(frozen=True)
class StudentStep:
    """What the student's attention needs for one answer forward.

    Args:
        middle: `[B, A, K]` bool, True where key `k` is a middle token for answer query `a` (past the sink and
            outside the recent window), so it sees only the scaled/masked key channels.
        channels: `layer -> (multiplier [H, D], dropped [H] bool or None)`: the per-channel key multiplier of each
            KV head, and which heads drop their middle tokens entirely (binary stage, zero kept channels).
    """

    middle: torch.Tensor
    channels: Callable[[int], tuple[torch.Tensor, torch.Tensor | None] | None]


_active_step: contextvars.ContextVar[StudentStep | None] = contextvars.ContextVar("leank_student", default=None)


def register() -> None:
    """Register the student's attention and mask functions with transformers (safe to call repeatedly)."""
    register_implementation(STUDENT_IMPLEMENTATION, _student_attention_forward)


@contextlib.contextmanager
def student_step(step: StudentStep) -> Iterator[None]:
    """Within the block, forwards of a model using ``"leank_student"`` attend as the student."""
    token = _active_step.set(step)
    try:
        yield
    finally:
        _active_step.reset(token)


def _student_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    step = _active_step.get()
    channels = step.channels(module.layer_idx) if step is not None else None
    if channels is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    multiplier, dropped = channels
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    output = masked_answer_attention(query, key, value, attention_mask, step.middle, multiplier, dropped, scaling)
    return output.transpose(1, 2).contiguous(), None


def masked_answer_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    middle: torch.Tensor,
    multiplier: torch.Tensor,
    dropped: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention of answer queries in which middle keys are `k ⊙ multiplier` (and absent for `dropped` heads).

    Args:
        query: `[B, Hq, A, D]` answer queries; key, value: `[B, H, K, D]` (prompt + answer).
        attention_mask: `[B, 1, A, K]` bool (True = may attend) or None for plain causal attention with the
            queries at the end.
        middle: `[B, A, K]` bool, see `StudentStep`.
        multiplier: `[H, D]` per-channel key multiplier (gradients flow into it).
        dropped: `[H]` bool heads whose middle tokens are dropped, or None.
        scaling: softmax scale.

    Returns `[B, Hq, A, D]` in the query's dtype. Scores are fp32 and computed in chunks of answer queries, so the
    full T x T matrix never exists; q · (k ⊙ m) is computed as (q ⊙ m) · k, which scales A queries, not K keys.
    """
    batch, q_heads, queries, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    allowed = _allowed(attention_mask, batch, queries, keys, query.device)
    q = query.float().reshape(batch, kv_heads, group, queries, head_dim)
    k, v = key.float(), value.float()
    chunk = max(1, _MAX_SCORES // max(1, batch * q_heads * keys))
    outputs = []
    for start in range(0, queries, chunk):
        rows = slice(start, start + chunk)
        q_rows = q[:, :, :, rows]
        full = torch.einsum("bhgad,bhkd->bhgak", q_rows, k)
        scaled = torch.einsum("bhgad,bhkd->bhgak", q_rows * multiplier.float()[None, :, None, None, :], k)
        in_middle = middle[:, None, None, rows]  # [B, 1, 1, a, K]
        scores = torch.where(in_middle, scaled, full) * scaling
        hidden = ~allowed[:, None, None, rows]
        if dropped is not None:
            hidden = hidden | (in_middle & dropped[None, :, None, None, None])
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1).nan_to_num(0.0)
        outputs.append(torch.einsum("bhgak,bhkd->bhgad", probs, v))
    output = torch.cat(outputs, dim=3) if len(outputs) > 1 else outputs[0]
    return output.reshape(batch, q_heads, queries, head_dim).to(query.dtype)


def _allowed(mask: torch.Tensor | None, batch: int, queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """`[B, A, K]` bool from transformers' attention mask, or causal with queries at the end. The mask is boolean:
    ``"leank_student"`` is registered with SDPA's mask function (`register`)."""
    if mask is None:
        rows = torch.arange(keys - queries, keys, device=device)[:, None]
        return (torch.arange(keys, device=device)[None, :] <= rows).expand(batch, queries, keys)
    return mask[:, 0].expand(batch, queries, keys)
