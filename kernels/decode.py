"""Triton decode kernel: one query token per row over a pruned LeanK cache, reading only the kept bytes.

Split-KV (flash-decoding): program `(b * H + h, split)` handles KV head `h` of row `b` for one slice of the middle
tokens; split 0 also takes the full-width sink and window tokens. The query heads of a KV head (GQA) are the rows
of one tile, so every K/V byte is loaded once per KV head. Middle keys are read `CHUNK` kept channels at a time,
so heads with any kept count (a multiple of `CHUNK`, 0 included) share one launch; a head that keeps nothing reads
no middle K or V at all. Each split writes its output and log-sum-exp; `_combine_kernel` merges them.

Run `python -m leank_hf.kernels.decode` on a CUDA machine to check one shape against the reference and time it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import PrunedKV

_LOG2E = 1.4426950408889634
_BLOCK_N = 64  # tokens per tile


@triton.jit
def _online_softmax_update(scores, values, m_i, l_i, acc):
    """Fold a tile of base-2 scores `[G, N]` (-inf = no weight) and its values `[N, D]` into the running state."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no valid key must not produce NaN
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
    return m_new, l_i, acc


@triton.jit
def _full_width_tiles(
    q, k_base, v_base, stride_kn, stride_vn, valid_base, stride_valid, count, limit, m_i, l_i, acc, qk_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, VALID_IS_COUNT: tl.constexpr,
):  # fmt: skip
    """Attend over `count` full-width tokens; valid if `index < limit` (sink) or by a per-token flag (window)."""
    offs_d = tl.arange(0, D)
    for start in range(0, count, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < count
        if VALID_IS_COUNT:
            valid = in_range & (offs_n < limit)
        else:
            valid = in_range & (tl.load(valid_base + offs_n * stride_valid, mask=in_range, other=0) != 0)
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=in_range[None, :], other=0.0)
        scores = tl.dot(q, k) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_update(scores, v, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _leank_decode_split_kernel(
    Q, stride_qb, stride_qh,
    SinkK, SinkV, SinkLen, stride_sb, stride_sh, stride_sn, sink_slots,
    MidK, stride_mkb, stride_mkn,
    MidV, stride_mvb, stride_mvh, stride_mvn,
    MidValid, stride_mvalb, middle_len,
    WinK, WinV, WinValid, stride_wb, stride_wh, stride_wn, stride_wvalb, window_len,
    KeptIdx, HeadOffsets, ValueRows,
    OutPart, LsePart, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    qk_scale, split_len,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // NUM_KV_HEADS
    h = pid_bh % NUM_KV_HEADS
    offs_g = tl.arange(0, GROUP_PAD)
    g_mask = offs_g < GROUP
    heads = h * GROUP + offs_g
    offs_d = tl.arange(0, D)
    q_rows = Q + b * stride_qb + heads[:, None] * stride_qh

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)

    # Middle tokens of this split, on the head's kept channels only.
    head_start = tl.load(HeadOffsets + h)
    kept = tl.load(HeadOffsets + h + 1) - head_start
    first = split * split_len
    last = tl.minimum(first + split_len, middle_len)
    if kept > 0:
        value_row = tl.load(ValueRows + h)
        offs_c = tl.arange(0, CHUNK)
        v_base = MidV + b * stride_mvb + value_row * stride_mvh
        for start in range(first, last, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            in_range = offs_n < last
            valid = in_range & (tl.load(MidValid + b * stride_mvalb + offs_n, mask=in_range, other=0) != 0)
            scores = tl.zeros([GROUP_PAD, BLOCK_N], dtype=tl.float32)
            for c in range(0, kept, CHUNK):
                channels = tl.load(KeptIdx + head_start + c + offs_c)
                q_chunk = tl.load(q_rows + channels[None, :], mask=g_mask[:, None], other=0.0)
                k_ptrs = MidK + b * stride_mkb + offs_n[None, :] * stride_mkn + (head_start + c + offs_c)[:, None]
                k_chunk = tl.load(k_ptrs, mask=in_range[None, :], other=0.0)
                scores += tl.dot(q_chunk, k_chunk)
            scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
            v = tl.load(v_base + offs_n[:, None] * stride_mvn + offs_d[None, :], mask=in_range[:, None], other=0.0)
            m_i, l_i, acc = _online_softmax_update(scores, v, m_i, l_i, acc)

    # Full-width tokens (sink, then the window that ends with this step's token) go to split 0.
    if split == 0:
        q = tl.load(q_rows + offs_d[None, :], mask=g_mask[:, None], other=0.0)  # [G, D]
        sink_len = tl.load(SinkLen + b)
        sink_offset = b * stride_sb + h * stride_sh
        m_i, l_i, acc = _full_width_tiles(
            q, SinkK + sink_offset, SinkV + sink_offset, stride_sn, stride_sn, SinkLen, 0, sink_slots, sink_len,
            m_i, l_i, acc, qk_scale, D, BLOCK_N, True,
        )  # fmt: skip
        window_offset = b * stride_wb + h * stride_wh
        m_i, l_i, acc = _full_width_tiles(
            q, WinK + window_offset, WinV + window_offset, stride_wn, stride_wn, WinValid + b * stride_wvalb, 1,
            window_len, 0, m_i, l_i, acc, qk_scale, D, BLOCK_N, False,
        )  # fmt: skip

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    out_ptrs = OutPart + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(out_ptrs, out, mask=g_mask[:, None])
    tl.store(LsePart + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _combine_kernel(
    OutPart, LsePart, Out, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_fb, stride_fh, num_splits,
    NUM_Q_HEADS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """Merge the splits of one (row, query head) by their log-sum-exp; a row with no key at all outputs zeros."""
    pid = tl.program_id(0)
    b = pid // NUM_Q_HEADS
    hq = pid % NUM_Q_HEADS
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D)
    lse = tl.load(LsePart + b * stride_lb + hq * stride_lh + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp2(lse - m_safe)
    total = tl.sum(weights, axis=0)
    parts = tl.load(
        OutPart + b * stride_ob + hq * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
        mask=(offs_s < num_splits)[:, None], other=0.0,
    )  # fmt: skip
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * stride_fb + hq * stride_fh + offs_d, out.to(Out.dtype.element_ty))


def supports(query: torch.Tensor, cache: PrunedKV) -> bool:
    """Whether `leank_decode_triton` handles this step: one bf16/fp16 query token, power-of-two head_dim >= 16,
    and kept counts in multiples of at least 16 channels (the smallest `tl.dot` operand)."""
    head_dim = query.shape[-1]
    return (
        query.shape[2] == 1
        and query.dtype in (torch.bfloat16, torch.float16)
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and cache.layout.chunk >= 16
    )


def _num_splits(batch_heads: int, middle_len: int, device: torch.device) -> int:
    """A power of two (so the combine kernel compiles for few sizes) that gives the GPU a few waves of programs."""
    if middle_len <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = max(1, math.ceil(4 * sms / batch_heads))
    by_length = max(1, middle_len // 256)  # at least ~256 middle tokens per split
    return 1 << (min(wanted, by_length, 256).bit_length() - 1)


def leank_decode_triton(query: torch.Tensor, cache: PrunedKV, scaling: float) -> torch.Tensor:
    """Same as `leank_attention_reference` for one query token per row (`Q == 1`), in one split + one merge launch.

    Args:
        query: `[B, Hq, 1, D]`, bf16/fp16/fp32; D a power of two (64, 128).
        cache: the stored tokens; the window ends with this step's token (see `PrunedKV`).
        scaling: multiplier of q·k.

    Returns:
        `[B, Hq, 1, D]` in the query dtype (fp32 accumulation).
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    if q_len != 1:
        raise ValueError(f"leank_decode_triton handles one query token per row, got {q_len}")
    layout = cache.layout
    num_heads = cache.recent_keys.shape[1]
    group = num_q_heads // num_heads
    chunk = layout.chunk
    if not supports(query, cache):
        raise ValueError("this query/cache is outside what leank_decode_triton handles; see `supports`")
    middle_len = cache.middle_keys.shape[1]
    splits = _num_splits(batch * num_heads, middle_len, query.device)
    split_len = triton.cdiv(triton.cdiv(max(middle_len, 1), splits), _BLOCK_N) * _BLOCK_N

    q = query[:, :, 0]
    out_part = torch.empty(batch, num_q_heads, splits, head_dim, dtype=torch.float32, device=query.device)
    lse_part = torch.empty(batch, num_q_heads, splits, dtype=torch.float32, device=query.device)
    mid_k, mid_v, win_k, win_v = cache.middle_keys, cache.middle_values, cache.recent_keys, cache.recent_values
    sink_k, sink_v = cache.sink_keys, cache.sink_values
    if sink_k.stride() != sink_v.stride() or win_k.stride() != win_v.stride():
        raise ValueError("sink (and window) keys and values must share one layout")
    _leank_decode_split_kernel[(batch * num_heads, splits)](
        q, q.stride(0), q.stride(1),
        sink_k, sink_v, cache.sink_lengths, sink_k.stride(0), sink_k.stride(1), sink_k.stride(2), sink_k.shape[2],
        mid_k, mid_k.stride(0), mid_k.stride(1),
        mid_v, mid_v.stride(0), mid_v.stride(1), mid_v.stride(2),
        cache.middle_valid, cache.middle_valid.stride(0), middle_len,
        win_k, win_v, cache.recent_valid, win_k.stride(0), win_k.stride(1), win_k.stride(2),
        cache.recent_valid.stride(0), win_k.shape[2],
        layout.kept_flat, layout.offsets_table, layout.value_rows_table,
        out_part, lse_part, out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        scaling * _LOG2E, split_len,
        NUM_KV_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=head_dim,
        CHUNK=chunk, BLOCK_N=_BLOCK_N,
    )  # fmt: skip
    out = torch.empty(batch, num_q_heads, 1, head_dim, dtype=query.dtype, device=query.device)
    _combine_kernel[(batch * num_q_heads,)](
        out_part, lse_part, out, out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1), splits,
        NUM_Q_HEADS=num_q_heads, SPLITS_PAD=max(2, splits), D=head_dim,
    )  # fmt: skip
    return out
